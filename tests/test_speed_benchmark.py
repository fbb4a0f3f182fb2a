"""The speed benchmark still runs: on a machine without CUDA, its tiny CPU configuration (no timings asserted)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

SCRIPT = Path(__file__).parent.parent / "scripts" / "speed_benchmark.py"  # --single-call: unet_call_benchmark.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_speed_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--single-call", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    variants = {r["variant"] for r in rows}
    assert {"sdpa", "nocore", "tomesd", "todo", "agent", "free-agent", "tome", "free-tome", "schedule"} <= variants
    assert all(float(r["ms"]) > 0 for r in rows if not r["error"])
    table = (tmp_path / "speed.md").read_text()
    assert "| eager | tiny-sd15 | 0.4 |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_nn_benchmark_smoke(tmp_path):
    script = SCRIPT.parent / "nn_benchmark.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 1024 | agent (plain) |" in (tmp_path / "nn.md").read_text()


def test_compiled_variants_take_turns_without_recompiling(monkeypatch):
    """Each compiled variant patches and compiles its own copy of the UNet, so that the variants can take
    turns (host noise then hits all alike) without a recompile at any turn."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import unet_call_benchmark as bench

    import agentsd
    from agentsd.models import unet_from_config

    torch._dynamo.reset()
    counters.clear()
    graphs_after_call = []  # (timed calls, graphs compiled so far) after each times_ms
    timed = bench.times_ms

    def recording(fn, reps, warmup=3):
        out = timed(fn, reps, warmup)
        graphs_after_call.append((reps, counters["stats"]["unique_graphs"]))
        return out

    monkeypatch.setattr(bench, "times_ms", recording)
    unet = unet_from_config("sd15", tiny=True).eval()
    inputs = bench.unet_inputs(unet, "sd15", 64, torch.device("cpu"))
    names = ["sdpa", "agent", "tome"]
    times, errors = bench.compiled_turns(unet, "sd15", names, 0.5, inputs, reps=4, backend="eager", turns=2)
    torch._dynamo.reset()

    assert not errors and {name: len(t) for name, t in times.items()} == dict.fromkeys(names, 4)
    assert [reps for reps, _ in graphs_after_call] == [0] * 3 + [2] * 6  # warm-ups (compiles), then 2 turns of 3
    compiled = graphs_after_call[2][1]
    assert compiled >= len(names)
    assert all(graphs == compiled for _, graphs in graphs_after_call[3:])  # no turn compiled anything
    assert not agentsd.is_patched(unet)  # the variants patched their copies


@torch.no_grad()
def test_free_plans_and_no_merge_run_the_lean_forward(monkeypatch):
    """The free plans' blocks run lean_forward as the stages' do, and no-merge is the baseline's math."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import unet_call_benchmark as bench

    from agentsd.models import unet_from_config

    unet = unet_from_config("sd15", tiny=True).eval()
    inputs = bench.unet_inputs(unet, "sd15", 64, torch.device("cpu"))
    baseline = unet(*inputs).sample
    blocks = [block for _, block in bench.blocks_up_to(unet, 1)]
    with bench.variant(unet, "sd15", "no-merge", 0.5, inputs[0].shape[-2:]):
        assert all("forward" in block.__dict__ for block in blocks)
        assert torch.equal(unet(*inputs).sample, baseline)
    with bench.variant(unet, "sd15", "free-agent", 0.5, inputs[0].shape[-2:]):
        assert all("forward" in block.__dict__ for block in blocks)
        lean = unet(*inputs).sample
        for block in blocks:
            del block.forward
        assert torch.equal(unet(*inputs).sample, lean)
        assert not torch.equal(lean, baseline)
    assert not any("forward" in block.__dict__ for block in blocks)


def test_eager_speedups_pair_each_round_with_its_sdpa_turn(monkeypatch):
    """A host that slows down between rounds (here 3x in the second and third) must not show as a
    slower variant: each round's variant is compared with that round's SDPA."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import unet_call_benchmark as bench

    turns = {"sdpa": [10.0, 10.0, 30.0], "agent": [11.0, 33.0, 33.0], "tome": [8.0, 24.0, 24.0],
             "free-agent": [10.0, 30.0, 30.0]}  # fmt: skip
    speedups = bench.paired_speedups(turns)
    assert speedups["agent"] == pytest.approx(10 / 11)  # unpaired medians would say 10 / 33
    assert speedups["sdpa"] == 1.0
    times = {name: t for name, t in turns.items()}
    rows = bench.result_rows("sd15-512", "eager", 0.4, times, {}, speedups)
    schedule = next(r for r in rows if r["variant"] == "schedule")
    assert schedule["speedup"] == pytest.approx(1 / (0.4 * 11 / 10 + 0.6 * 8 / 10))
    table = bench.markdown("test", rows, [])
    assert "(0.91x, 91% of free)" in table  # the agent stage, and against its free plan (1.00x)
