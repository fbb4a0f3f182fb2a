"""Autotuning runs once per GPU, kernel source and shape, not once per process: a new process at a size
seen before reads the config from disk. Run on the CPU through Triton's interpreter, with a fake tuner
that counts its calls."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentsd import kernels, tuned_configs

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")

# One process: the configs of both matching kernels for a block input at the given grid (a plan asks
# for them so), then the tuner's calls.
PROCESS = textwrap.dedent(
    """
    import sys, time, torch
    from agentsd.kernels import matching, matching_kernels, tuning_seconds
    calls = []

    def fake_autotune(tuned, grid, args, meta):
        calls.append(tuned.fn.fn.__name__)
        time.sleep(0.05)
        return tuned.configs[-1]

    matching._autotune = fake_autotune
    if len(sys.argv) > 3:  # the package's configs, from this folder
        from pathlib import Path
        from agentsd import tuned_configs
        tuned_configs.SHIPPED = Path(sys.argv[3])
    height, width = map(int, sys.argv[1:3])
    x = torch.randn(2, height * width, 32)
    for tuned in (matching_kernels._best_destination_kernel, matching_kernels._best_destination_resident_kernel):
        assert matching._matching_config(tuned, None, x, height * width // 4) is tuned.configs[-1]
    print(len(calls), tuning_seconds())
    """
)


def tuner_calls(cache, height=8, width=8, seconds=None, shipped=None) -> int:
    env = dict(os.environ, AGENTSD_CACHE_DIR=str(cache), TRITON_INTERPRET="1")
    command = [sys.executable, "-c", PROCESS, str(height), str(width), *([str(shipped)] if shipped else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    calls, tuned_seconds = result.stdout.split()[-2:]
    if seconds is not None:  # what the process reports as its time spent tuning (the benchmark's column)
        seconds.append(float(tuned_seconds))
    return int(calls)


def test_a_second_process_does_not_tune_again(tmp_path):
    seconds = []
    assert tuner_calls(tmp_path, seconds=seconds) == 2
    files = list((tmp_path / "kernel-configs").rglob("*.json"))
    assert len(files) == 2 and all("BLOCK_M" in json.loads(f.read_text()) for f in files)
    assert tuner_calls(tmp_path, seconds=seconds) == 0  # a fresh process, the same size: read from disk
    assert seconds[0] >= 0.1 and seconds[1] == 0
    # a file from other candidates or a torn one is never used
    files[0].write_text(json.dumps({"BLOCK_M": 999}))
    files[1].write_text("{not json")
    assert tuner_calls(tmp_path) == 2
    assert tuner_calls(tmp_path, 8, 12) == 2  # another size tunes once


def test_unwritable_cache_only_means_tuning_again(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("AGENTSD_CACHE_DIR", str(blocker))  # a file where a folder should be
    tuned_configs.store(kernels.torch.device("cpu"), "kernel", (1, 2), {"BLOCK_M": 1})
    assert tuned_configs.load(kernels.torch.device("cpu"), "kernel", (1, 2)) is None


def test_configs_follow_every_file_of_the_kernels_package(tmp_path, monkeypatch):
    """A change to any of the package's files puts its configs in another folder (tuned anew)."""
    assert len(list(tuned_configs._KERNELS.glob("*.py"))) > 1
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(tuned_configs, "_KERNELS", tmp_path)
    first = tuned_configs._source_hash()
    (tmp_path / "b.py").write_text("b changed")
    assert tuned_configs._source_hash() != first


def test_shipped_configs_spare_the_first_process_tuning(tmp_path, monkeypatch):
    """A new machine (empty cache) at a size the package has configs for does not tune, while those
    configs were tuned for this source of the kernels; other sizes still tune."""
    assert tuner_calls(tmp_path / "collecting") == 2
    monkeypatch.setenv("AGENTSD_CACHE_DIR", str(tmp_path / "collecting"))
    table = tuned_configs.collected(kernels.torch.device("cpu"))  # as scripts/collect_kernel_configs.py writes it
    assert table["gpu"] == "interpreter" and len(table["configs"]) == 2
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "interpreter.json").write_text(json.dumps(table))
    assert tuner_calls(tmp_path / "new-machine", shipped=shipped) == 0
    assert not (tmp_path / "new-machine").exists()  # nothing tuned, nothing written
    assert tuner_calls(tmp_path / "new-machine", 8, 12, shipped=shipped) == 2
    (shipped / "interpreter.json").write_text(json.dumps(dict(table, source="another source")))
    assert tuner_calls(tmp_path / "other-machine", shipped=shipped) == 2


def test_shipped_tables_are_for_this_source_of_the_kernels():
    """Every table in the package was tuned for the kernels as they are: after a change to
    agentsd/kernels/, collect again (scripts/collect_kernel_configs.py on each GPU)."""
    for path in tuned_configs.SHIPPED.glob("*.json"):
        table = json.loads(path.read_text())
        assert table["gpu"] == path.stem and table["configs"]
        assert table["source"] == tuned_configs._source_hash(), f"{path.name} is stale: collect it again"


def test_collect_script_writes_a_table_the_package_reads(tmp_path, monkeypatch):
    """scripts/collect_kernel_configs.py (tiny UNets in the interpreter): a table for this GPU and this
    source with one config per tuned key, the timings of each call with how they were measured, and the
    user's own cache left alone, and its own tuning cache removed."""
    out, user_cache, temp = tmp_path / "out", tmp_path / "user-cache", tmp_path / "temp"
    temp.mkdir()
    script = Path(__file__).parent.parent / "scripts" / "collect_kernel_configs.py"
    env = dict(os.environ, TRITON_INTERPRET="1", AGENTSD_CACHE_DIR=str(user_cache), TMPDIR=str(temp))
    argv = ["--tiny", "--kinds", "sd15", "--dtypes", "fp16", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, check=True)
    table = json.loads((out / "interpreter.json").read_text())
    timings = json.loads((out / "timings-interpreter.json").read_text())
    assert table["gpu"] == "interpreter" and table["source"] == tuned_configs._source_hash()
    assert [r["label"] for r in timings["rows"]] == ["sd15 64x64 fp16 step 0", "sd15 64x64 fp16 step 40"]
    assert len(table["configs"]) == 2 and all(key.endswith("-float16") for key in table["configs"])
    assert timings["header"]["command"].endswith(" ".join(argv))
    assert timings["header"]["command"] in (out / "timings-interpreter.md").read_text()
    assert not user_cache.exists() and not any(temp.iterdir())
    monkeypatch.setattr(tuned_configs, "SHIPPED", out)
    tuned_configs.shipped.cache_clear()
    try:
        assert tuned_configs.shipped("interpreter") == table["configs"]
    finally:
        tuned_configs.shipped.cache_clear()


def test_a_gpu_without_a_table_reads_one_of_its_architecture(tmp_path, monkeypatch):
    """An H200 (no table of its own) takes the H100's (both sm90) and tunes nothing at its sizes; a GPU
    of another architecture takes none, nor a sibling's table of another source of the kernels."""
    monkeypatch.setattr(tuned_configs, "SHIPPED", tmp_path)
    tuned_configs.shipped.cache_clear()
    source = tuned_configs._source_hash()
    tables = {"NVIDIA_H100_80GB_HBM3-sm90": {"k/1": {"BLOCK_M": 1}}, "NVIDIA_A100-SXM4-80GB-sm80": {"k/1": {"BLOCK_M": 2}}}
    for gpu, configs in tables.items():
        (tmp_path / f"{gpu}.json").write_text(json.dumps({"gpu": gpu, "source": source, "configs": configs}))
    (tmp_path / "NVIDIA_GH200-sm90.json").write_text(json.dumps({"gpu": "x", "source": "old", "configs": {"k/1": {}}}))  # read first
    try:
        assert tuned_configs.shipped("NVIDIA_H200-sm90") == tables["NVIDIA_H100_80GB_HBM3-sm90"]
        assert tuned_configs.shipped("NVIDIA_A100-SXM4-40GB-sm80") == tables["NVIDIA_A100-SXM4-80GB-sm80"]
        assert tuned_configs.shipped("NVIDIA_A100-SXM4-80GB-sm80") == tables["NVIDIA_A100-SXM4-80GB-sm80"]
        assert tuned_configs.shipped("NVIDIA_GeForce_RTX_4090-sm89") == {}
        assert tuned_configs.shipped("interpreter") == {}
    finally:
        tuned_configs.shipped.cache_clear()
