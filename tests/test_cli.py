"""`agentsd generate` end to end on tiny pipelines, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from agentsd.cli import main
from agentsd.models import tiny_pipeline


def generate(tmp_path, *args):
    out = tmp_path / "out"
    main(["generate", "a red cube", "a blue ball", "--model", "tiny", "--steps", "3", "--out", str(out), *args])
    return out


@pytest.mark.parametrize("method", ["baseline", "tome", "agentsd"])
def test_generate_writes_pngs_with_metadata(tmp_path, method, capsys):
    out = generate(tmp_path, "--method", method, "--seed", "7", "--batch-size", "2")
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    meta = Image.open(files[1]).text
    assert meta["prompt"] == "a blue ball" and meta["seed"] == "8" and meta["model"] == "tiny" and meta["method"] == method
    settings = json.loads(meta["settings"])
    assert settings == ({} if method == "baseline" else json.loads(meta["agentsd"])["settings"])
    if method == "tome":
        assert settings["sx"] == 2 and settings["agent_ratio"] == 0.0 and settings["ratio"] == 0.4
    assert "s/image" in capsys.readouterr().out


def test_an_image_regenerates_from_its_metadata(tmp_path):
    out = generate(tmp_path, "--seed", "3", "--batch-size", "2", "--sx", "4", "--sy", "4", "--agent-ratio", "0.9")
    meta = json.loads(Image.open(out / "00001.png").text["agentsd"])
    again = tmp_path / "again"
    s = meta["settings"]
    main(["generate", meta["prompt"], "--model", meta["model"], "--steps", str(meta["steps"]), "--seed", str(meta["seed"]),
          "--patch-seed", str(s["seed"]), "--sx", str(s["sx"]), "--sy", str(s["sy"]), "--agent-ratio",
          str(s["agent_ratio"]), "--ratio", str(s["ratio"]), "--out", str(again)])  # fmt: skip
    first, second = (np.asarray(Image.open(p)) for p in (out / "00001.png", again / "00000.png"))
    # alone in its batch the GEMMs have other shapes: at most a rounding step apart, on a few pixels
    difference = np.abs(first.astype(int) - second.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_tiny_sdxl_and_prompts_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\n")
    out = tmp_path / "out"
    main(["generate", "--prompts-file", str(prompts), "--model", "tiny-sdxl", "--steps", "2", "--out", str(out)])
    assert len(list(out.glob("*.png"))) == 2


def test_saved_pipeline_loads_through_the_model_argument(tmp_path):
    tiny_pipeline("sd15").save_pretrained(tmp_path / "saved")  # tokenizer included, as on the hub
    out = tmp_path / "out"
    main(["generate", "a cat", "--model", str(tmp_path / "saved"), "--steps", "2", "--out", str(out)])
    assert Image.open(out / "00000.png").size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["x", "--method", "fast"], "invalid choice: 'fast'"),
    (["x", "--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["x", "--sx", "2"], "missing: sy, agent_ratio"),
    (["--prompts-file", "EMPTY"], "has no prompts"),
    (["--prompts-file", "MISSING"], "does not exist"),
    ([], "give at least one prompt"),
    (["x", "--model", "/no/such/folder"], "could not load the pipeline '/no/such/folder'"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    (tmp_path / "EMPTY").write_text("\n\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    out = tmp_path / "out"
    if "--model" not in args:
        args += ["--model", "tiny"]
    result = subprocess.run([sys.executable, "-m", "agentsd.cli", "generate", *args, "--out", str(out)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # nothing written
