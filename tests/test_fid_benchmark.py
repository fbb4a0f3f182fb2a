"""The FID benchmark end to end on the tiny pipeline, with a stand-in feature network."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from agentsd import cli, fid_benchmark
from agentsd.features import load_feature_network
from standin import StandInFeatures

TESTS = Path(__file__).parent
STANDIN = f"{TESTS / 'standin.py'}:features"  # --features as a path: no PYTHONPATH needed


def benchmark_args(tmp_path, real_dir, *extra):
    return ["--model", "tiny", "--num-images", "4", "--steps", "2", "--height", "64", "--width", "64", "--batch-size",
            "2", "--methods", "baseline", "tome", "agentsd", "--ratios", "0.3", "0.5", "--real-dir", str(real_dir),
            "--out", str(tmp_path / "out"), "--device", "cpu", *extra]  # fmt: skip


@pytest.fixture
def real_dir(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(g.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def test_end_to_end_writes_everything_and_resumes(tmp_path, real_dir):
    args = fid_benchmark.parse_args(benchmark_args(tmp_path, real_dir))
    results = fid_benchmark.run(args, feature=StandInFeatures())
    out = tmp_path / "out"
    for name in ("results.csv", "results.json", "results.md", "fid_vs_time.png", "real_stats.npz"):
        assert (out / name).is_file(), name
    setup = json.loads((out / "results.json").read_text())["setup"]
    assert (setup["model"], setup["steps"], setup["scheduler"], setup["height"]) == ("tiny", 2, "PNDMScheduler", 64)
    assert "standin.StandInFeatures" in setup["features"] and setup["versions"]["torch"] == torch.__version__
    assert setup["date"][:4].isdigit() and setup["real"].endswith("(6 images)")
    assert "- scheduler: PNDMScheduler" in (out / "results.md").read_text()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [r["run"] for r in results] and {r["model"] for r in rows} == {"tiny"}
    assert [r["run"] for r in results] == ["baseline", "tome-0.3", "tome-0.5", "agentsd-0.3", "agentsd-0.5"]
    assert all(len(list((out / "images" / r["run"]).glob("*.png"))) == 4 for r in results)
    assert all(r["fid"] > 0 and r["s_per_image"] > 0 for r in results)
    assert results[0]["psnr"] is None and all(r["psnr"] > 5 and 0 < r["ssim"] <= 1 for r in results[1:])
    assert "| agentsd | 0.5 |" in (out / "results.md").read_text()
    prompt = Image.open(out / "images" / "tome-0.3" / "00003.png").text["prompt"]
    assert prompt == "A high quality photograph of a goldfish."  # 2 images per class: image 3 is class 1

    removed = out / "images" / "agentsd-0.5" / "00002.png"
    os.remove(removed)
    torn = out / "runs" / "tome-0.3.rank0.json"
    torn.write_text(torn.read_text()[:5])  # as an interrupt left it before timings were written whole
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images/*/*.png")}
    again = fid_benchmark.run(fid_benchmark.parse_args(benchmark_args(tmp_path, real_dir)), feature=StandInFeatures())
    remade = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert remade == set((out / "images" / "tome-0.3").glob("*.png"))  # the torn timing's run, nothing else
    assert removed.exists()  # and the missing image is back
    assert again[1]["run"] == "tome-0.3" and again[1]["s_per_image"] > 0
    # the image made again was made alone, not in its batch of 2: its GEMMs round otherwise (a step on a few
    # pixels, as test_cli's regenerated image), which moved its run's FID by 6.6e-6 of itself at the lowest
    # bounds (transformers 5.0), 3.3e-6 with torch 2.6; the runs left as they were score as before
    assert [r["fid"] for r in again] == pytest.approx([r["fid"] for r in results], rel=1e-4)
    kept = [i for i, r in enumerate(results) if r["run"] != removed.parent.name]
    assert [again[i]["fid"] for i in kept] == pytest.approx([results[i]["fid"] for i in kept], rel=1e-9)


def test_fid_is_zero_against_itself_and_grows_with_noise(tmp_path, real_dir):
    args = fid_benchmark.parse_args(["--real-dir", str(real_dir), "--height", "64", "--width", "64", "--device", "cpu"])
    metric, _ = fid_benchmark.make_fid(args, StandInFeatures(), "cpu")
    fid_benchmark.add_real_images(metric, args, "cpu")
    images = fid_benchmark._load(sorted(real_dir.glob("*.jpg")), (64, 64), "cpu")
    scores = []
    for noise in (0.0, 0.1, 0.3):
        metric.reset()
        metric.update((images + noise * torch.randn_like(images)).clamp(0, 1), real=False)
        scores.append(float(metric.compute()))
    assert abs(scores[0]) < 1e-6 and scores[0] < scores[1] < scores[2]
    # real statistics survive a round trip through the pytorch-fid .npz format
    mu, sigma = fid_benchmark.real_statistics(metric)
    fid_benchmark.set_real_statistics(metric, mu, sigma)
    np.testing.assert_allclose(fid_benchmark.real_statistics(metric)[1], sigma, atol=1e-10)


def test_frechet_distance_matches_scipy():
    g = np.random.default_rng(1)
    a, b = g.normal(size=(8, 8)), g.normal(size=(8, 8))
    mu1, mu2 = g.normal(size=8), g.normal(size=8)
    sigma1, sigma2 = a @ a.T + np.eye(8), b @ b.T + np.eye(8)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy.linalg.sqrtm(sigma1 @ sigma2).real)
    assert fid_benchmark.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["benchmark", *args])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--methods", "fast"], "argument --methods: invalid choice: 'fast'"),
    (["--ratios", "1.2"], "--ratios 1.2 (--methods tome): ratio must be in [0, 1)"),
    (["--ratios", "nan"], "argument --ratios: must be a finite number"),
    (["--no-fid", "--ratios", "0.3", "0.3000001"], "--ratios 0.3000001 gives the run tome-0.3 a second time"),
    (["--no-fid", "--ratios", "0.5", "0.5"], "--ratios 0.5 gives the run tome-0.5 a second time"),
    (["--real-dir", "MISSING"], "--real-dir MISSING does not exist or holds no images"),
    (["--prompts-file", "EMPTY"], "--prompts-file EMPTY is missing or has no prompts"),
    (["--num-images", "0"], "argument --num-images: must be a whole number >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    (["--images-per-class", "-2"], "argument --images-per-class: must be a whole number >= 1"),
    (["--height", "100"], "argument --height: must be a positive multiple of 8"),
    (["--steps", "0"], "argument --steps: must be a whole number >= 1"),
    (["--guidance", "inf"], "argument --guidance: must be a finite number"),
    (["--device", "nonsense"], "argument --device: 'nonsense' is not a torch device"),
    (["--out", "FILE"], "argument --out: FILE is a file, not a folder"),
    (["--real-stats", "FILE"], "--real-stats FILE is not a pytorch-fid .npz with mu and sigma"),
    (["--real-stats", "NOMU.npz"], "--real-stats NOMU.npz is not a pytorch-fid .npz with mu and sigma (KeyError"),
    (["--real-stats", "SHAPES.npz"], "--real-stats SHAPES.npz: mu must be (d,) and sigma (d, d)"),
    (["--real-stats", "DIM8.npz", "--features", STANDIN], "--real-stats DIM8.npz has 8 features, the FID network 16"),
    (["--real-dir", "BROKEN", "--features", STANDIN], "--real-dir BROKEN: cannot read an image"),
    (["--features", "standin"], "--features must be module:callable (a module importable or in the current folder)"),
    (["--features", "no_such_module_agentsd:features"], "--features no_such_module_agentsd:features: no module"),
    (["--features", "MISSING.py:features"], "--features MISSING.py:features: there is no file MISSING.py"),
    (["--features", f"{TESTS / 'standin.py'}:nothing"], "standin.py has no callable 'nothing'"),
    (["--features", "FEATURES.py:failing"], "failing() failed (RuntimeError: no weights here)"),
    (["--features", "FEATURES.py:not_a_module"], "torchmetrics' FID does not take it"),
    (["--no-fid", "--steps", "1000"], "--steps must be at most 999"),
    (["--no-fid", "--height", "8", "--width", "8", "--batch-size", "1"], "the pipeline stopped at --height 8"),
    (["--no-fid", "--real-dir", "BROKEN", "--features", STANDIN], "--no-fid excludes --real-dir, --features: it"),
    (["--no-fid", "--real-stats", "DIM8.npz", "--inception-weights", "FILE"], "--real-stats, --inception-weights"),
])  # fmt: skip
def test_bad_input(tmp_path, real_dir, args, message, capsys):
    (tmp_path / "EMPTY").write_text("\n")
    (tmp_path / "FILE").write_text("not an npz")
    np.savez(tmp_path / "NOMU.npz", mean=np.zeros(4))
    np.savez(tmp_path / "SHAPES.npz", mu=np.zeros(4), sigma=np.eye(3))
    np.savez(tmp_path / "DIM8.npz", mu=np.zeros(8), sigma=np.eye(8))
    (tmp_path / "BROKEN").mkdir()
    (tmp_path / "BROKEN" / "0.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "FEATURES.py").write_text("def failing():\n    raise RuntimeError('no weights here')\n\n"
                                          "def not_a_module():\n    return 'inception'\n")  # fmt: skip
    names = ("EMPTY", "FILE", "NOMU.npz", "SHAPES.npz", "DIM8.npz", "BROKEN", "FEATURES.py", "MISSING", "MISSING.py")
    path = lambda a: a.replace(a.split(":")[0], str(tmp_path / a.split(":")[0])) if a.split(":")[0] in names else a  # noqa: E731
    args, message = [path(a) for a in args], " ".join(path(w) for w in message.split(" "))
    before = sorted(tmp_path.rglob("*"))
    base = benchmark_args(tmp_path, real_dir)
    if "--real-stats" in args or "--no-fid" in args:  # each excludes --real-dir
        del base[base.index("--real-dir") : base.index("--real-dir") + 2]
    code, err = run_cli([*base, *args], capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("agentsd benchmark fid: error:") and message in last, err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_features_from_a_module_in_the_current_folder_or_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_agentsd_features.py").write_text((TESTS / "standin.py").read_text())
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    network = load_feature_network("my_agentsd_features:features")
    assert type(network).__name__ == "StandInFeatures" and sys.path == path_before
    assert type(load_feature_network(STANDIN)).__name__ == "StandInFeatures"
    assert type(load_feature_network("my_agentsd_features.py:features")).__name__ == "StandInFeatures"


def test_no_fid_writes_no_empty_plot_and_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    cli.main(["benchmark", "--model", "tiny", "--num-images", "2", "--steps", "2", "--height", "64", "--width", "64",
              "--methods", "agentsd", "--ratios", "0.5", "--no-fid", "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert not (out / "fid_vs_time.png").exists() and "No fid_vs_time.png" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert all(r["fid"] is None and r["s_per_image"] > 0 for r in saved["results"])
    setup = saved["setup"]
    assert setup["features"] == "none (--no-fid)" and setup["real"] is None
    assert setup["command"].startswith("agentsd benchmark fid --model tiny") and setup["steps"] == 2


def test_images_another_setting_left_in_out_are_not_reused(tmp_path, capsys):
    """A run resumes from the images in --out only where they were made as it would make them."""
    out = tmp_path / "out"
    args = ["--model", "tiny", "--num-images", "2", "--steps", "2", "--height", "64", "--width", "64", "--methods",
            "agentsd", "--ratios", "0.5", "--no-fid", "--out", str(out), "--device", "cpu"]  # fmt: skip
    cli.main(["benchmark", *args])
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for change, message in [(["--steps", "3"], "00000.png was made with steps 2, this run has 3 (--steps)"),
                            (["--height", "72"], "00000.png was made with size [64, 64], this run has [64, 72]"),
                            (["--dtype", "bf16"], "00000.png was made with dtype 'float32', this run has 'bfloat16'")]:
        code, err = run_cli([*args, *change], capsys)
        assert code == 2 and message in err.strip().splitlines()[-1] and "give another --out" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps  # nothing written
    image = out / "images" / "agentsd-0.5" / "00001.png"
    whole = image.read_bytes()
    for broken in (b"", whole[: len(whole) // 2]):  # empty, and cut short: that one opens, but does not load
        image.write_bytes(broken)
        code, err = run_cli(args, capsys)
        assert code == 2 and f"cannot read the image {image}" in err.strip().splitlines()[-1], err


def test_prompts_file_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Under LC_ALL=C PYTHONUTF8=0 a file is read as ASCII unless an encoding is given."""
    read_text = Path.read_text
    c_locale = lambda path, encoding=None, errors=None: read_text(path, encoding or "ascii", errors)  # noqa: E731
    monkeypatch.setattr(Path, "read_text", c_locale)
    (tmp_path / "prompts.txt").write_bytes("a café\nnaïve\n".encode())
    args = fid_benchmark.parse_args(["--prompts-file", str(tmp_path / "prompts.txt"), "--num-images", "3", "--no-fid"])
    fid_benchmark.check(args)
    assert fid_benchmark.prompts(args) == ["a café", "naïve", "a café"]


def test_step_caching_is_a_method_too(tmp_path):
    """DeepCache alone and composed with agentsd, beside the baseline, under `agentsd benchmark fid`."""
    pytest.importorskip("DeepCache")
    out = tmp_path / "out"
    cli.main(["benchmark", "fid", "--model", "tiny", "--num-images", "2", "--steps", "4", "--height", "64", "--width",
              "64", "--methods", "deepcache", "agentsd+deepcache", "--ratios", "0.5", "--deepcache-interval", "2",
              "--no-fid", "--out", str(out), "--device", "cpu"])  # fmt: skip
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["run"] for r in results] == ["baseline", "deepcache", "agentsd+deepcache-0.5"]
    assert all(r["s_per_image"] > 0 for r in results)
    composed = json.loads(Image.open(out / "images" / "agentsd+deepcache-0.5" / "00000.png").text["agentsd"])
    assert composed["deepcache"] == 2 and composed["settings"]["ratio"] == 0.5 and composed["settings"]["min_tokens"] == 0
    baseline, cached = (np.asarray(Image.open(out / "images" / run / "00001.png")) for run in ("baseline", "deepcache"))
    assert np.abs(baseline.astype(int) - cached.astype(int)).max() > 0  # DeepCache was on


def test_missing_inception_weights_message(tmp_path, real_dir):
    args = fid_benchmark.parse_args(["--real-dir", str(real_dir), "--inception-weights", str(tmp_path / "none.pth")])
    with pytest.raises(fid_benchmark.BenchmarkError, match="--inception-weights"):
        fid_benchmark.make_fid(args, None, "cpu")


def inception_weights_file(path: Path) -> None:
    """A weights file of torch-fidelity's Inception layout with random values: the real one is a download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch.object(torch, "load", return_value={}), mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="none")
    torch.save(network.state_dict(), path)


def test_inception_fid_end_to_end(tmp_path, real_dir, capsys):
    """The `fid` extra's smoke test (CI runs it in a venv of its own): torch-fidelity and torchvision import
    beside torch, and the benchmark measures FID with the real Inception network (random weights)."""
    pytest.importorskip("torch_fidelity", reason="needs the fid extra")
    import torchvision

    assert torchvision.ops.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1.0]), 0.5).tolist() == [0]
    weights = tmp_path / "inception.pth"
    inception_weights_file(weights)
    # the baseline alone: each FID takes the eigenvalues of a 2048 x 2048 product, 20 s on 2 cores
    cli.main(["benchmark", *benchmark_args(tmp_path, real_dir), "--num-images", "2", "--methods", "baseline",
              "--inception-weights", str(weights)])  # fmt: skip
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["setup"]["features"] == fid_benchmark.INCEPTION
    assert saved["setup"]["versions"]["torch-fidelity"] and saved["setup"]["versions"]["torchvision"]
    assert [r["run"] for r in saved["results"]] == ["baseline"] and np.isfinite(saved["results"][0]["fid"])


def test_accelerate_two_processes_equal_one(tmp_path, real_dir):
    # one thread per process in both runs, as accelerate sets it: CPU matmuls round alike
    # the child imports this checkout's agentsd, whatever is installed; --features names a file
    path = os.pathsep.join(filter(None, [str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    common = benchmark_args(tmp_path, real_dir, "--features", STANDIN, "--ratios", "0.5")
    single = [a if a != str(tmp_path / "out") else str(tmp_path / "single") for a in common]
    subprocess.run([sys.executable, "-m", "agentsd.fid_benchmark", *single], check=True, env=env, capture_output=True)
    # accelerate 1.x starts one process for `--cpu --num_processes 2`; `--multi_gpu` starts two on the CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "agentsd.fid_benchmark", *common]  # fmt: skip
    result = subprocess.run(launch, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert len(list((out / "runs").glob("baseline.rank*.json"))) == 2  # both processes generated
    for image in (tmp_path / "single").glob("images/*/*.png"):
        twin = out / image.relative_to(tmp_path / "single")
        np.testing.assert_array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(twin)))
    one, two = (json.loads((d / "results.json").read_text())["results"] for d in (tmp_path / "single", out))
    assert [r["fid"] for r in two] == pytest.approx([r["fid"] for r in one], rel=1e-9)
    assert [r["ssim"] for r in two] == [r["ssim"] for r in one]
