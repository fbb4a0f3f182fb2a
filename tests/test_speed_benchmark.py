"""The speed benchmark still runs: on a machine without CUDA, its tiny CPU configuration (no timings asserted)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "scripts" / "speed_benchmark.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_speed_benchmark_smoke(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--generation", "sd15-512", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    variants = {r["variant"] for r in rows}
    assert {"sdpa", "nocore", "tomesd", "todo", "agent", "free-agent", "tome", "free-tome", "schedule"} <= variants
    assert all(float(r["ms"]) > 0 for r in rows if not r["error"])
    table = (tmp_path / "speed.md").read_text()
    assert "| eager | tiny-sd15 | 0.4 |" in table and "Whole generations" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke configuration")
def test_nn_benchmark_smoke(tmp_path):
    script = SCRIPT.parent / "nn_benchmark.py"
    result = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 1024 | agent (plain) |" in (tmp_path / "nn.md").read_text()
