"""`agentsd generate` end to end on tiny pipelines, and its errors."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tqdm.auto import tqdm

import agentsd.generate
from agentsd.cli import build_parser, main
from agentsd.models import tiny_pipeline
from agentsd.pipelines import load_pipeline

REPO = Path(__file__).parent.parent


def generate(tmp_path, *args):
    out = tmp_path / "out"
    # --min-tokens 0: the tiny model's blocks are below the default 8192 tokens and would not be merged
    # (an agentsd setting: not for the methods that patch nothing)
    patched = not any(args[i : i + 2] in (("--method", "baseline"), ("--method", "deepcache")) for i in range(len(args)))
    main(["generate", "a red cube", "a blue ball", "--model", "tiny", "--steps", "3", *(["--min-tokens", "0"] * patched),
          "--out", str(out), *args])  # fmt: skip
    return out


@pytest.mark.parametrize("method", ["baseline", "tome", "agentsd"])
def test_generate_writes_pngs_with_metadata(tmp_path, method, capsys):
    out = generate(tmp_path, "--method", method, "--seed", "7", "--batch-size", "2")
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    meta = Image.open(files[1]).text
    assert meta["prompt"] == "a blue ball" and meta["seed"] == "8" and meta["model"] == "tiny" and meta["method"] == method
    assert meta["batch_size"] == "2"  # without guidance an odd batch merges otherwise (tomesd's rule)
    settings = json.loads(meta["settings"])
    assert settings == ({} if method == "baseline" else json.loads(meta["agentsd"])["settings"])
    if method == "tome":
        assert settings["sx"] == 2 and settings["agent_ratio"] == 0.0 and settings["ratio"] == 0.4
    assert "s/image" in capsys.readouterr().out


def test_a_second_run_into_the_same_folder_adds_images(tmp_path):
    out = generate(tmp_path, "--steps", "2")
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    generate(tmp_path, "--steps", "2", "--seed", "5")
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert all((out / name).read_bytes() == data for name, data in first.items())  # the first run's, untouched
    assert Image.open(out / "00002.png").text["seed"] == "5"
    (out / "².png").write_bytes(b"")  # a digit to str.isdigit, not to int()
    main(["generate", "--model", "tiny", "a cat", "--steps", "1", "a dog", "--out", str(out)])  # prompts around options
    assert sorted(p.name for p in out.glob("0*.png"))[-2:] == ["00004.png", "00005.png"]


def test_runs_into_one_folder_at_once_never_take_the_same_name(tmp_path, monkeypatch):
    """Another run (one per GPU, say) writes 00001.png while this one makes 00000.png: this one goes on at
    00002.png, leaving the other's image."""
    out, save_png = tmp_path / "out", agentsd.generate.save_png

    def save_while_another_run_saves(path, image, metadata):
        save_png(path, image, metadata)
        if path.name == "00000.png":
            (out / "00001.png").write_bytes(b"the other run's")

    monkeypatch.setattr(agentsd.generate, "save_png", save_while_another_run_saves)
    main(["generate", "a", "b", "--model", "tiny", "--steps", "1", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert (out / "00001.png").read_bytes() == b"the other run's" and Image.open(out / "00002.png").text["prompt"] == "b"


@pytest.mark.parametrize("kind", ["speed", "fid"])
def test_benchmarks_refuse_an_empty_out(kind, capsys):
    """--out "" (an unset shell variable) would write into the current folder."""
    code, err = run_main(["benchmark", kind, "--out", "", *(["--no-fid"] if kind == "fid" else [])], capsys)
    assert_one_line_error(code, err, "argument --out: must name a folder, got an empty string", prog=f"agentsd benchmark {kind}")


@pytest.mark.parametrize("args", [["benchmark"], ["benchmark", "sped"]])
def test_benchmark_names_its_two_kinds(args, capsys):
    code, err = run_main(args, capsys)
    assert_one_line_error(code, err, "choose speed or fid", prog="agentsd benchmark")
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "--help"])
    assert exit_.value.code == 0 and "agentsd benchmark speed ... (whole generations) or agentsd benchmark fid" in capsys.readouterr().out


def test_tome_takes_the_given_stride(tmp_path):
    """--method tome is plain ToMe at the given --sx/--sy (tomesd's parameters), 2x2 by default."""
    image = lambda out: np.asarray(Image.open(out / "00000.png"))  # noqa: E731
    strided = generate(tmp_path / "4x4", "--method", "tome", "--sx", "4", "--sy", "4")
    settings = json.loads(Image.open(strided / "00000.png").text["agentsd"])["settings"]
    assert (settings["sx"], settings["sy"], settings["agent_ratio"]) == (4, 4, 0.0)
    assert not np.array_equal(image(strided), image(generate(tmp_path / "2x2", "--method", "tome")))


def test_an_image_regenerates_from_its_metadata(tmp_path):
    out = generate(tmp_path, "--seed", "3", "--batch-size", "2", "--sx", "4", "--sy", "4", "--agent-ratio", "0.9")
    meta = json.loads(Image.open(out / "00001.png").text["agentsd"])
    again = tmp_path / "again"
    s = meta["settings"]
    main(["generate", meta["prompt"], "--model", meta["model"], "--steps", str(meta["steps"]), "--seed", str(meta["seed"]),
          "--patch-seed", str(s["seed"]), "--sx", str(s["sx"]), "--sy", str(s["sy"]), "--agent-ratio",
          str(s["agent_ratio"]), "--ratio", str(s["ratio"]), "--min-tokens", str(s["min_tokens"]), "--out", str(again)])  # fmt: skip
    first, second = (np.asarray(Image.open(p)) for p in (out / "00001.png", again / "00000.png"))
    # alone in its batch the GEMMs have other shapes: at most a rounding step apart, on a few pixels
    difference = np.abs(first.astype(int) - second.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_the_negative_prompt_reaches_the_pipeline_and_the_metadata(tmp_path):
    out = generate(tmp_path, "--method", "baseline", "--negative-prompt", "blurry")
    metadata = Image.open(out / "00000.png").text
    assert metadata["negative_prompt"] == "blurry"
    pipe = tiny_pipeline("sd15")  # the CLI's "tiny"
    direct = pipe("a red cube", negative_prompt="blurry", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00000.png")), np.asarray(direct.images[0]))
    without = generate(tmp_path / "without", "--method", "baseline")
    assert not np.array_equal(np.asarray(Image.open(without / "00000.png")), np.asarray(direct.images[0]))
    assert json.loads(Image.open(without / "00000.png").text["agentsd"])["negative_prompt"] is None


def test_the_readme_names_every_generate_option():
    options = [o for action in build_parser()[1]._actions for o in action.option_strings if o.startswith("--")]
    readme = (REPO / "README.md").read_text()
    assert [o for o in options if o != "--help" and not re.search(re.escape(o) + r"(?![\w-])", readme)] == []


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


def test_only_text_to_image_unet_pipelines(tmp_path, capsys):
    """Every method, the baseline too, needs what it times and records: prompts in, a Stable Diffusion UNet."""
    from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionImg2ImgPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    StableDiffusionImg2ImgPipeline(**tiny_pipeline("sd15").components).save_pretrained(tmp_path / "img2img")
    for model, message in (("ddpm", "--model: agentsd supports"), ("img2img", "StableDiffusionImg2ImgPipeline takes an input image")):
        out = str(tmp_path / "out" / model)
        for method in ("baseline", "agentsd"):
            code, err = run_main(["generate", "x", "--model", str(tmp_path / model), "--method", method, "--out", out], capsys)
            assert_one_line_error(code, err, message)
        code, err = run_main(["benchmark", "fid", "--model", str(tmp_path / model), "--no-fid", "--num-images", "1",
                              "--steps", "1", "--out", out], capsys)  # fmt: skip
        assert_one_line_error(code, err, message, prog="agentsd benchmark fid")
        assert not (tmp_path / "out").exists()


class SavingInterrupted:
    """save_png that Ctrl-C stops at image `at` (0: the first), midway through writing it."""

    def __init__(self, at):
        self.at, self.calls, self.save_png = at, 0, agentsd.generate.save_png

    def __call__(self, path, image, metadata):
        self.calls += 1
        if self.calls > self.at:
            image.save = lambda target, **kw: (Path(target).write_bytes(b"\x89PNG half"), (_ for _ in ()).throw(KeyboardInterrupt()))
        self.save_png(path, image, metadata)


@pytest.mark.parametrize("at", [0, 1])
def test_ctrl_c_says_what_is_saved_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys, at):
    monkeypatch.setattr(agentsd.generate, "save_png", SavingInterrupted(at).__call__)
    out = tmp_path / "new" / "out"
    code, err = run_main(["generate", "a", "b", "c", "--model", "tiny", "--steps", "1", "--out", str(out)], capsys)
    assert code == 130 and "Traceback" not in err
    saved = "1 of 3 images saved (00000.png to 00000.png)" if at else "0 of 3 images saved"
    assert err.strip().splitlines()[-1] == f"agentsd generate: interrupted; {saved}"
    if at:
        assert sorted(p.name for p in out.iterdir()) == ["00000.png"]
        Image.open(out / "00000.png").load()
    else:
        assert not (tmp_path / "new").exists()  # the folders it made, removed again


def test_out_of_memory_names_the_size_not_a_traceback(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(agentsd.generate, "generate_images", out_of_memory)
    out = tmp_path / "out"
    code, err = run_main(["generate", "a", "--model", "tiny", "--height", "4096", "--width", "4096", "--device", "cpu",
                          "--out", str(out)], capsys)  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("agentsd generate: out of memory on cpu at --height 4096 --width 4096 "
                                            "--batch-size 1; 0 of 1 images saved")  # fmt: skip
    assert not out.exists()


def test_files_written_whole_leave_nothing_when_interrupted(tmp_path, monkeypatch):
    from agentsd import files

    files.write_whole(tmp_path / "a.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        files.write_whole(tmp_path / "b.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def run_main(args, capsys) -> tuple[int, str]:
    """(exit code, stderr) of an in-process `agentsd` run that exits."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, message, prog="agentsd generate"):
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # argparse: the usage, then one line "prog: error: ..."
    assert last.startswith(f"{prog}: error:") and message in last, err


@pytest.mark.parametrize("args, message", [
    (["x", "--method", "fast"], "argument --method: invalid choice: 'fast'"),
    (["x", "--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["x", "--ratio", "nan"], "argument --ratio: must be a finite number"),
    (["x", "--sx", "2"], "missing: --sy, --agent-ratio"),
    (["x", "--sx", "0", "--sy", "2", "--agent-ratio", "0.5"], "argument --sx: must be a whole number >= 1"),
    (["x", "--sx", "2", "--sy", "2", "--agent-ratio", "1"], "--agent-ratio must be in [0, 1)"),
    (["x", "--k-scale2", "inf"], "argument --k-scale2: must be a finite number"),
    (["x", "--k-shortcut", "2"], "--k-shortcut must be in [0, 1]"),
    (["x", "--min-tokens", "-1"], "argument --min-tokens: must be a whole number >= 0"),
    (["x", "--deepcache", "0"], "argument --deepcache: must be a whole number >= 1"),
    (["x", "--method", "tome", "--agent-ratio", "0.9"], "--agent-ratio must be 0 with method 'tome' (plain ToMe)"),
    (["x", "--method", "baseline", "--k-scale2", "0.5"], "argument --k-scale2: an agentsd setting, for --method tome"),
    (["x", "--method", "deepcache", "--ratio", "0.5"], "argument --ratio: an agentsd setting"),
    (["x", "--method", "baseline", "--no-rand"], "argument --no-rand: an agentsd setting"),
    (["x", "y", "--seed", str(2**63 - 1)], "argument --seed: image i uses seed + i, below 2**63: at most 2**63 - 2"),
    (["x", "--max-downsample", "3"], "argument --max-downsample: invalid choice: 3"),
    (["x", "--attn-precision", "fp8"], "argument --attn-precision: invalid choice"),
    (["x", "--scheduler", "fast"], "argument --scheduler: invalid choice"),
    (["x", "--dtype", "fp64"], "argument --dtype: invalid choice"),
    (["--prompts-file", "EMPTY"], "argument --prompts-file: EMPTY has no prompts"),
    (["--prompts-file", "MISSING"], "argument --prompts-file: MISSING does not exist"),
    (["--prompts-file", "FOLDER"], "argument --prompts-file: FOLDER does not exist or is not a file"),
    (["--prompts-file", "LATIN1"], "argument --prompts-file: cannot read"),
    ([], "give at least one prompt"),
    (["x", "--height", "100"], "argument --height: must be a positive multiple of 8"),
    (["x", "--width", "0"], "argument --width: must be a positive multiple of 8"),
    (["x", "--height", "-64"], "argument --height: must be a positive multiple of 8"),
    (["x", "--height", "64.5"], "argument --height: must be a whole number"),
    (["x", "--device", "cuda"] if not torch.cuda.is_available() else ["x", "--device", "cuda:99"], "argument --device: cuda"),
    (["x", "--device", "cuda:3"] if torch.cuda.device_count() < 4 else ["x", "--device", "cuda:99"], "argument --device: cuda"),
    (["x", "--device", "xpu"] if not (hasattr(torch, "xpu") and torch.xpu.is_available()) else ["x", "--device", "xpu:99"],
     "argument --device: xpu"),
    (["x", "--device", "nonsense"], "argument --device: 'nonsense' is not a torch device"),
    (["x", "--steps", "0"], "argument --steps: must be a whole number >= 1"),
    (["x", "--steps", "-3"], "argument --steps: must be a whole number >= 1"),
    (["x", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["x", "--guidance", "-1"], "argument --guidance: must be >= 0"),
    (["x", "--negative-prompt", "blurry", "--guidance", "1"], "argument --negative-prompt: acts only with guidance"),
    (["x", "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    (["x", "--seed", "-1"], "argument --seed: must be a whole number in [0, 2**63)"),
    (["x", "--patch-seed", str(2**63)], "argument --patch-seed: must be a whole number in [0, 2**63)"),
    (["x", "--out", "FILE"], "argument --out: FILE is a file, not a folder"),
    (["x", "--out", ""], "argument --out: must name a folder, got an empty string"),
    (["x", "--out", "FILE/sub"], "argument --out: FILE is a file, so FILE/sub cannot be made"),
    (["x", "--model", "/no/such/folder"], "could not load --model /no/such/folder: there is no such folder"),
    (["x", "--model", "FOLDER"], "the folder has no model_index.json"),
    (["x", "--model", "FILE"], "it is a file; --model takes a diffusers pipeline folder"),
    # the ones below load the tiny pipeline first
    (["x", "--steps", "1000"], "argument --steps: at most 999"),
    (["x", "--height", "8", "--width", "8", "--steps", "2"], "the pipeline stopped at --height 8 --width 8"),
    (["x", "--out", "/proc/agentsd-test/out"], "argument --out: cannot make the folder /proc/agentsd-test/out"),
])  # fmt: skip
def test_bad_input_exits_2_with_one_line_naming_the_option(tmp_path, args, message, capsys):
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "LATIN1").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "FOLDER").mkdir()
    names = ("EMPTY", "MISSING", "FOLDER", "LATIN1", "FILE")
    path = lambda a: str(tmp_path / a) if a.split("/")[0] in names else a  # noqa: E731
    args, message = [path(a) for a in args], " ".join(path(w) for w in message.split(" "))
    out = tmp_path / "out"
    if "--model" not in args:
        args += ["--model", "tiny"]
    if "--out" not in args:
        args += ["--out", str(out)]
    before = sorted(tmp_path.rglob("*"))
    code, err = run_main(["generate", *args], capsys)
    assert_one_line_error(code, err, message)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert not Path("/proc/agentsd-test").exists()


def child_env(**extra) -> dict:
    """The environment of a child `python -m agentsd.cli`: this checkout's agentsd first, whatever is installed."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra)


def test_missing_weights_say_what_was_tried_and_what_to_do(tmp_path):
    # a subprocess: no traceback reaches stderr, whatever diffusers and huggingface_hub log on the way
    model = "nobody-agentsd/no-such-model"
    result = subprocess.run([sys.executable, "-m", "agentsd.cli", "generate", "x", "--model", model, "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env=child_env(HF_HUB_OFFLINE="1"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"agentsd generate: error: could not load --model {model}: there is no such folder")
    assert "not in the Hugging Face cache" in error and f"`hf download {model} --local-dir FOLDER`" in error
    for repeated in ("huggingface-cli", "local_files_only", "stacktrace", "stack trace above"):
        assert repeated not in error
    assert not (tmp_path / "out").exists()


def test_a_torchvision_that_does_not_match_torch_is_one_paragraph(tmp_path):
    # PyPI's torchvision beside a CPU torch fails at import like this one; diffusers and transformers import it
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env["PYTHONPATH"]])
    for command in (["generate", "x", "--model", "tiny"], ["benchmark", "fid", "--model", "tiny", "--no-fid"]):
        result = subprocess.run([sys.executable, "-m", "agentsd.cli", *command, "--out", str(tmp_path / "out")],
                                capture_output=True, text=True, env=env)  # fmt: skip
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith(f"agentsd {' '.join(command[:2]) if command[0] == 'benchmark' else 'generate'}: error: torchvision")
        assert "is installed but does not work with torch" in error
        assert "operator torchvision::nms does not exist" in error and "pip uninstall torchvision" in error
    assert not (tmp_path / "out").exists()


class RecordingBar(tqdm):
    """tqdm that keeps (desc, n, total) of each bar it closes."""

    closed = []

    def close(self):
        if not self.disable:
            RecordingBar.closed.append((self.desc, self.n, self.total))
        super().close()


@pytest.mark.parametrize("scheduler, steps", [("pndm", 3), ("heun", 2)])
def test_the_steps_bar_counts_the_unet_steps(tmp_path, scheduler, steps, monkeypatch, capsys):
    monkeypatch.setattr(agentsd.generate, "tqdm", RecordingBar)
    RecordingBar.closed.clear()
    main(["generate", "one", "--model", "tiny", "--scheduler", scheduler, "--steps", str(steps), "--out", str(tmp_path)])
    schedule = load_pipeline("tiny", scheduler=scheduler).scheduler
    schedule.set_timesteps(steps)
    unet_steps = len(schedule.timesteps)  # PNDM: one more, Heun: 2n - 1
    assert dict((desc, (n, total)) for desc, n, total in RecordingBar.closed) == {"steps": (unet_steps, unet_steps),
                                                                                  "images": (1, 1)}  # fmt: skip
    assert f"1 image in {tmp_path}:" in capsys.readouterr().out  # one image, not "1 images"


def test_deepcache_composes_and_is_recorded(tmp_path, capsys, monkeypatch):
    pytest.importorskip("DeepCache")
    out = generate(tmp_path, "--deepcache", "2", "--steps", "6")
    assert json.loads(Image.open(out / "00000.png").text["agentsd"])["deepcache"] == 2
    plain = generate(tmp_path / "plain", "--steps", "6")
    assert not np.array_equal(np.asarray(Image.open(out / "00000.png")), np.asarray(Image.open(plain / "00000.png")))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "DeepCache" else real(name, *a, **k))
    code, err = run_main(["generate", "x", "--model", "tiny", "--deepcache", "3", "--out", str(tmp_path / "none")], capsys)
    assert_one_line_error(code, err, 'argument --deepcache: DeepCache is not installed: pip install "agentsd[deepcache]"')
    code, err = run_main(["generate", "x", "--model", "tiny", "--method", "deepcache", "--out", str(tmp_path / "none")], capsys)
    assert_one_line_error(code, err, 'argument --method: DeepCache is not installed: pip install "agentsd[deepcache]"')
    assert not (tmp_path / "none").exists()


def test_deepcache_methods_turn_deepcache_on(tmp_path, capsys):
    """--method deepcache / agentsd+deepcache are --deepcache 3 (DeepCache's usual interval) over the
    baseline / agentsd, unless --deepcache says otherwise."""
    pytest.importorskip("DeepCache")

    def image(name, *args):
        out = generate(tmp_path / name, "--steps", "6", *args)
        return np.asarray(Image.open(out / "00000.png")), json.loads(Image.open(out / "00000.png").text["agentsd"])

    capsys.readouterr()
    cached, metadata = image("deepcache", "--method", "deepcache")
    assert metadata["deepcache"] == 3 and "(deepcache, DeepCache interval 3, cpu)" in capsys.readouterr().out
    assert np.array_equal(cached, image("baseline-deepcache", "--method", "baseline", "--deepcache", "3")[0])
    assert not np.array_equal(cached, image("baseline", "--method", "baseline")[0])
    composed, metadata = image("composed", "--method", "agentsd+deepcache")
    assert metadata["deepcache"] == 3 and np.array_equal(composed, image("agentsd-deepcache", "--deepcache", "3")[0])
    assert image("interval", "--method", "agentsd+deepcache", "--deepcache", "2")[1]["deepcache"] == 2


def test_ratio_0_is_the_baseline_bit_for_bit(tmp_path):
    for method, settings in (("baseline", []), ("agentsd", ["--ratio", "0", "--min-tokens", "0"])):  # --min-tokens 0:
        main(["generate", "a red cube", "--model", "tiny", "--steps", "2", "--method", method, *settings,  # the tiny
              "--out", str(tmp_path / method)])  # fmt: skip                           # model's blocks go through the patch too
    baseline, agentsd_0 = (np.asarray(Image.open(tmp_path / m / "00000.png")) for m in ("baseline", "agentsd"))
    np.testing.assert_array_equal(agentsd_0, baseline)
