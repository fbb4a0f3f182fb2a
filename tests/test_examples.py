"""Every example runs with a tiny model."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).parent.parent / "examples"
RUNS = {
    "sd15.py": ["--model", "tiny", "--steps", "3"],
    "sdxl.py": ["--model", "tiny-sdxl", "--steps", "3"],
    "img2img.py": ["--model", "tiny", "--steps", "4"],
    "controlnet.py": ["--model", "tiny", "--steps", "3"],
    "compile.py": ["--model", "tiny", "--steps", "3", "--backend", "eager"],
    "deepcache.py": ["--model", "tiny", "--steps", "4"],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_example_runs_with_a_tiny_model(name, tmp_path):
    if name == "deepcache.py":
        pytest.importorskip("DeepCache")
    out = tmp_path / "image.png"
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *RUNS[name], "--out", str(out)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).size == (64, 64)
