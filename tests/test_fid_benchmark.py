"""The FID benchmark end to end on the tiny pipeline, with a stand-in feature network."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from agentsd import fid_benchmark
from standin import StandInFeatures

TESTS = Path(__file__).parent


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
    assert [r["run"] for r in results] == ["baseline", "tome-0.3", "tome-0.5", "agentsd-0.3", "agentsd-0.5"]
    assert all(len(list((out / "images" / r["run"]).glob("*.png"))) == 4 for r in results)
    assert all(r["fid"] > 0 and r["s_per_image"] > 0 for r in results)
    assert results[0]["psnr"] is None and all(r["psnr"] > 5 and 0 < r["ssim"] <= 1 for r in results[1:])
    assert "| agentsd | 0.5 |" in (out / "results.md").read_text()
    prompt = Image.open(out / "images" / "tome-0.3" / "00003.png").text["prompt"]
    assert prompt == "A high quality photograph of a goldfish."  # 2 images per class: image 3 is class 1

    removed = out / "images" / "agentsd-0.5" / "00002.png"
    os.remove(removed)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("images/*/*.png")}
    again = fid_benchmark.run(fid_benchmark.parse_args(benchmark_args(tmp_path, real_dir)), feature=StandInFeatures())
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing generated twice
    assert removed.exists()  # but the missing image is back
    assert [r["fid"] for r in again] == pytest.approx([r["fid"] for r in results], rel=1e-6)


def test_fid_is_zero_against_itself_and_grows_with_noise(tmp_path, real_dir):
    args = fid_benchmark.parse_args(["--real-dir", str(real_dir), "--height", "64", "--width", "64", "--device", "cpu"])
    metric = fid_benchmark.make_fid(args, StandInFeatures(), "cpu")
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


@pytest.mark.parametrize("args, message", [
    (["--methods", "fast"], "method must be one of"),
    (["--ratios", "1.2"], "ratio must be in [0, 1)"),
    (["--real-dir", "MISSING"], "does not exist or holds no images"),
    (["--prompts-file", "EMPTY"], "has no prompts"),
])  # fmt: skip
def test_bad_input(tmp_path, real_dir, args, message):
    (tmp_path / "EMPTY").write_text("\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "MISSING") else a for a in args]
    command = [sys.executable, "-m", "agentsd.cli", "benchmark", *benchmark_args(tmp_path, real_dir), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_inception_weights_message(tmp_path, real_dir):
    args = fid_benchmark.parse_args(["--real-dir", str(real_dir), "--inception-weights", str(tmp_path / "none.pth")])
    with pytest.raises(fid_benchmark.BenchmarkError, match="--inception-weights"):
        fid_benchmark.make_fid(args, None, "cpu")


def test_accelerate_two_processes_equal_one(tmp_path, real_dir):
    # one thread per process in both runs, as accelerate sets it: CPU matmuls round alike
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    common = benchmark_args(tmp_path, real_dir, "--features", "standin:features", "--ratios", "0.5")
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
    one, two = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "single", out))
    assert [r["fid"] for r in two] == pytest.approx([r["fid"] for r in one], rel=1e-9)
    assert [r["ssim"] for r in two] == [r["ssim"] for r in one]
