"""`agentsd benchmark speed`: whole generations, every method, its outputs and its bad input (on the
CPU: the tiny configuration; no timings asserted)."""

import csv
import json
from pathlib import Path

import pytest
import torch

import agentsd
from agentsd import speed_benchmark

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU configuration")


def test_every_method_runs_and_every_output_is_written(tmp_path):
    pytest.importorskip("DeepCache")
    pytest.importorskip("tomesd")
    speed_benchmark.main(["--rounds", "2", "--first-image-methods", "agentsd", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md", "speed.png"]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == list(speed_benchmark.METHODS)
    assert all(r["finite"] and len(r["seconds"]) == 2 and r["s_per_image"] > 0 for r in rows)
    baseline = rows[0]
    assert baseline["speedup"] == 1.0 and "first_image_s" not in baseline
    agentsd_row = rows[1]
    assert agentsd_row["first_image_s"] > 0 and agentsd_row["first_image_cold_s"] > 0  # both fresh processes ran
    # the kernels run on CUDA only: nothing tuned here, and the seconds are reported as such
    assert agentsd_row["first_image_tuning_s"] == agentsd_row["first_image_cold_tuning_s"] == 0
    assert all(r["warmup_s"] > 0 and r["warmup_tuning_s"] == 0 for r in rows)
    assert [r["method"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == list(speed_benchmark.METHODS)
    head = json.loads((tmp_path / "results.json").read_text())["header"]
    assert head["command"].startswith("agentsd benchmark speed") and head["torch"] == torch.__version__
    assert "| tiny | eager | agentsd+deepcache |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--methods", "fast"], "invalid choice: 'fast'"),
        (["--configs", "sd15-999"], "invalid choice: 'sd15-999'"),
        (["--deepcache-interval", "0"], "--deepcache-interval must be at least 1"),
        (["--steps", "0"], "--steps must be in [1, 999]"),
        (["--steps", "1000"], "--steps must be in [1, 999]"),
        (["--modes", "graph"], "invalid choice: 'graph'"),
        (["--methods", "agentsd", "--first-image-methods", "deepcache"], "--first-image-methods deepcache: not among --methods"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        speed_benchmark.main([*args, "--out", str(out)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_each_run_writes_a_new_folder_unless_out_is_given(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    speed_benchmark.main(["--methods", "baseline", "--rounds", "1", "--first-image-methods"])
    (run,) = (tmp_path / "outputs" / "speed").iterdir()
    assert (run / "results.json").exists() and f"results in outputs/speed/{run.name}" in capsys.readouterr().out


def test_an_out_with_an_earlier_runs_results_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text("the earlier run")
    with pytest.raises(SystemExit) as exit_:
        speed_benchmark.main(["--rounds", "1", "--first-image-methods", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"--out {tmp_path} holds the results of an earlier run (results.json)" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "the earlier run"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_first_images_default_to_the_baseline_and_agentsd_where_they_run():
    assert speed_benchmark.parse_args([]).first_image_methods == ["baseline", "agentsd"]
    assert speed_benchmark.parse_args(["--methods", "agentsd-tome"]).first_image_methods == ["baseline"]
    assert speed_benchmark.parse_args(["--methods", "agentsd-tome", "--first-image-methods"]).first_image_methods == []


def test_a_missing_peer_package_is_named(tmp_path, capsys, monkeypatch):
    real = speed_benchmark.importlib.util.find_spec
    monkeypatch.setattr(speed_benchmark.importlib.util, "find_spec", lambda name: None if name == "DeepCache" else real(name))
    with pytest.raises(SystemExit) as exit_:
        speed_benchmark.main(["--methods", "agentsd+deepcache", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert 'needs the DeepCache package: pip install "agentsd[deepcache]"' in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_refused_before_running(tmp_path, capsys, monkeypatch):
    """A file, a path under a file, a folder that cannot be made: exit 2 before a minute is measured (the
    results are written after the first config)."""
    monkeypatch.setattr(speed_benchmark, "steady_rows", lambda *a: pytest.fail("the benchmark ran"))
    file = tmp_path / "file"
    file.write_text("keep")
    for out, message in ((file, "is a file, not a folder"), (file / "sub", "is a file, so"),
                         (Path("/proc/agentsd-test/out"), "cannot make the folder /proc/agentsd-test/out")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            speed_benchmark.main(["--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "error: --out: " in err and message in err, err
    assert file.read_text() == "keep" and not Path("/proc/agentsd-test").exists()


def test_agentsd_benchmark_speed_is_this_benchmark(tmp_path, capsys):
    from agentsd import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["benchmark", "speed", "--rounds", "0", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "agentsd benchmark speed: error: --rounds must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["compile", "compile-regional"])
def test_compiled_modes_compile_each_methods_own_unet(mode):
    """compile wraps the method's UNet copy; compile-regional (diffusers' compile_repeated_blocks)
    compiles each of its transformer blocks; the base pipeline's UNet, shared by none, stays as it was."""
    from diffusers.models.attention import BasicTransformerBlock

    base, _, _ = speed_benchmark.base_pipeline("tiny", torch.device("cpu"))
    pipe = speed_benchmark.method_pipeline(base, "agentsd", mode, speed_benchmark.parse_args([]))
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    if mode == "compile":
        assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule) and pipe.unet._orig_mod is not base.unet
    else:
        assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert all(m._compiled_call_impl is None for m in base.unet.modules())
    assert agentsd.is_patched(pipe) and not agentsd.is_patched(base)


def test_memory_is_read_from_an_image_after_the_warm_up(monkeypatch):
    """The warm-up image's peaks hold kernel tuning, compiling and CUDA graph recording: the loop's and
    the decode's peaks come from a later image of the same pipeline, before the timed rounds."""
    calls = []  # (pipeline, whether memory is read) per image, in order
    generate = speed_benchmark.generate

    def recording(pipe, steps, call, memory=None):
        calls.append((pipe, memory is not None))
        return generate(pipe, steps, call, memory=memory)

    monkeypatch.setattr(speed_benchmark, "generate", recording)
    args = speed_benchmark.parse_args(["--rounds", "1", "--methods", "agentsd"])
    speed_benchmark.steady_rows("tiny", "eager", args.methods, args)
    pipes = list(dict.fromkeys(pipe for pipe, _ in calls))
    assert len(pipes) == 2
    for pipe in pipes:
        own = [reads for p, reads in calls if p is pipe]
        assert own == [False, True, False]  # warm-up, the image whose memory is read, one timed round


def test_the_plot_of_the_baseline_alone_warns_of_nothing():
    import warnings

    rows = [dict(config="tiny", mode="eager", method="baseline", speedup=1.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "No artists with labels found to put in legend"
        assert speed_benchmark.plot(rows, dict(gpu="cpu", date="2026-12-06"))[:4] == b"\x89PNG"
