"""FID benchmark of baseline, ToMe and AgentSD: FID, seconds and peak GB per image, as a table and a plot.

    agentsd benchmark --real-dir imagenet-val --out outputs/fid            # the papers' protocol
    accelerate launch -m agentsd.fid_benchmark --real-dir imagenet-val     # the prompts split over GPUs

The protocol of the ToMe-SD and AgentSD papers by default: "A high quality photograph of a
{class}." over the 1,000 ImageNet-1k classes, 2 images per class (2,000), 512x512, 50 PNDM (PLMS)
steps, guidance 7.5, the same seed for image i under every method. FID is torchmetrics'
FrechetInceptionDistance with torch-fidelity's Inception (the pytorch-fid weights), against a folder
of real images (--real-dir, center-cropped and resized to the generated size) or pytorch-fid
statistics (--real-stats, an .npz with mu and sigma). PSNR, SSIM and, where its weights are there,
LPIPS compare each method's images with the baseline images of the same seed. Images already on disk
are not generated again, so an interrupted run continues where it stopped.
"""

import argparse
import csv
import io
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image, ImageOps

from .cli import add_model_arguments, check_model_arguments, exit_if_broken_install
from .environment import versions
from .features import load_feature_network
from .files import write_whole
from .generate import Job, generate_images, save_png
from .options import finite_float, folder, make_output_folder, nonnegative_int, positive_int, removed_if_failing
from .pipelines import (
    DEEPCACHE_INTERVAL,
    DTYPES,
    METHODS,
    UNPATCHED_METHODS,
    LoadError,
    check_deepcache_installed,
    check_text_to_image,
    load_pipeline,
    max_steps,
    patch_pipeline,
    patch_settings,
    pipeline_stopped,
    resolve_device,
    unpatch_pipeline,
    uses_deepcache,
)

CLASSES_FILE = Path(__file__).parent / "data" / "imagenet_classes.txt"
TEMPLATE = "A high quality photograph of a {}."  # the ToMe-SD / AgentSD papers' prompt
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".JPEG", ".webp", ".bmp"}
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION = "Inception-v3 pool3 (torch-fidelity, the pytorch-fid weights)"
PLOT = "fid_vs_time.png"
# what the images record that an option sets: a resume error names the option to change back
OPTIONS_OF_RECORD = {"prompt": "--prompts-file, --images-per-class", "seed": "--seed", "model": "--model",
                     "steps": "--steps", "guidance": "--guidance", "scheduler": "--scheduler", "dtype": "--dtype",
                     "settings": "--min-tokens, --seed", "deepcache": "--deepcache-interval",
                     "size": "--height, --width"}  # fmt: skip
TIMING_KEYS = {"seconds", "images", "peak_gb"}


class BenchmarkError(Exception):
    pass


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(scheduler="pndm", height=512, width=512, batch_size=4)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["baseline", "tome", "agentsd"],
                        help="deepcache: DeepCache alone; agentsd+deepcache: composed (pip install \"agentsd[deepcache]\")")
    parser.add_argument("--deepcache-interval", type=positive_int, default=DEEPCACHE_INTERVAL,
                        help="DeepCache's cache interval for the deepcache methods: the full UNet every N steps")
    parser.add_argument("--min-tokens", type=nonnegative_int, default=0,
                        help="apply_patch's min_tokens; 0, the papers' protocol: merge at 512px too (apply_patch's "
                             "own default, 8192, merges nothing there)")  # fmt: skip
    parser.add_argument("--ratios", nargs="+", type=finite_float, default=[0.1, 0.2, 0.3, 0.4, 0.5],
                        help="each in [0, 1)")
    parser.add_argument("--num-images", type=positive_int, default=2000)
    parser.add_argument("--images-per-class", type=positive_int, default=2)
    parser.add_argument("--prompts-file", help="one prompt a line, used in turn, instead of the ImageNet classes")
    real = parser.add_mutually_exclusive_group()
    real.add_argument("--real-dir", help="folder of real images, for example 5 ImageNet validation images per class")
    real.add_argument("--real-stats", help="pytorch-fid statistics of the real images: an .npz with mu and sigma")
    parser.add_argument("--no-fid", action="store_true", help="only generate and time (no real images needed)")
    parser.add_argument("--inception-weights", help=f"the Inception weights file, if it cannot be downloaded ({INCEPTION_URL})")
    parser.add_argument("--features", help="another feature network for FID (tests, experiments): module:callable "
                        "(importable or in the current folder) or path/to/file.py:callable")
    parser.add_argument("--out", type=folder, default="outputs/fid")
    args = parser.parse_args(argv)
    args.parser = parser
    return args


def main(argv=None, prog=None) -> None:
    args = parse_args(argv, prog)
    check_model_arguments(args, args.parser)
    exit_if_broken_install(args.parser)
    args.command = f"{prog or 'python -m agentsd.fid_benchmark'} {shlex.join(sys.argv[1:] if argv is None else argv)}"
    try:
        run(args)
    except (BenchmarkError, LoadError) as error:
        args.parser.error(str(error))


def run(args, feature=None) -> list[dict] | None:
    """Generate every run's missing images, then (main process) measure and write the results."""
    runs = check(args)
    # On a machine without CUDA, `accelerate launch --multi_gpu` gives CPU processes only with cpu=True.
    state = PartialState(cpu=args.device == "cpu" or (args.device is None and not torch.cuda.is_available()))
    device, dtype = resolve_device(args.device if state.num_processes == 1 else str(state.device),
                                   DTYPES[args.dtype] if args.dtype else None)  # fmt: skip
    metric, features = make_fid(args, feature, device) if not args.no_fid else (None, None)
    if metric is not None and state.is_main_process:
        add_real_images(metric, args, device)  # bad real images or statistics stop the run before it generates
    pipe = load_pipeline(args.model, dtype=dtype, device=device, scheduler=args.scheduler)
    try:
        check_text_to_image(pipe)
    except TypeError as error:
        raise BenchmarkError(f"--model: {error}") from None
    limit = max_steps(pipe.scheduler)
    if args.steps > limit:
        raise BenchmarkError(f"--steps must be at most {limit} (the scheduler's training timesteps less one), got "
                             f"{args.steps}")  # fmt: skip
    out = Path(args.out)
    jobs = [Job(i, prompt, args.seed + i) for i, prompt in enumerate(prompts(args))]
    check_earlier_images(out, args, pipe, runs, jobs)
    try:
        made = make_output_folder(out)
    except ValueError as error:
        raise BenchmarkError(f"--out: {error}") from None
    with removed_if_failing(out, made):
        for name, method, settings in runs:
            generate_run(args, state, pipe, out, name, method, settings, jobs)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = measure(args, runs, jobs, metric, device)
    write_results(out, results, setup(args, pipe, features))
    return results


def generate_run(args, state, pipe, out: Path, name: str, method: str, settings: dict, jobs: list[Job]) -> None:
    """This process's share of the run's missing images, and their seconds and peak memory in runs/."""
    redo = read_timings(out, name) is None  # a timing file torn by an interrupt: the run is made again, timed
    missing = jobs if redo else [job for job in jobs if not image_file(out, name, job).exists()]
    state.wait_for_everyone()  # every process lists `missing` before any writes, or they split it differently
    if redo and state.is_main_process:
        for path in timing_files(out, name):  # every process's, or a stale one would add to the new timings
            path.unlink()
    state.wait_for_everyone()  # removed before any process writes its new one
    batches = [missing[i : i + args.batch_size] for i in range(0, len(missing), args.batch_size)]
    mine = [job for batch in batches[state.process_index :: state.num_processes] for job in batch]
    if not mine:
        return
    metadata = image_metadata(args, pipe, method, settings)
    patch_pipeline(pipe, settings, deepcache=metadata["deepcache"])
    try:
        stats = generate_images(
            pipe, mine, save=lambda job, image: _save(out, name, job, image, metadata), steps=args.steps,
            guidance=args.guidance, height=args.height, width=args.width, batch_size=args.batch_size,
            progress=state.is_main_process,
        )  # fmt: skip
    except ValueError as error:
        raise BenchmarkError(pipeline_stopped(error, args.height, args.width, args.steps, pipe.scheduler)) from None
    unpatch_pipeline(pipe)
    timing = dict(seconds=stats.timed_seconds, images=stats.timed_images, peak_gb=stats.peak_gb)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_whole(timing_file(out, name, state.process_index), json.dumps(timing))  # never torn by an interrupt


def timing_file(out: Path, run: str, rank: int | str) -> Path:
    return out / "runs" / f"{run}.rank{rank}.json"


def timing_files(out: Path, run: str) -> list[Path]:
    """Every process's timing file of the run."""
    return sorted(out.glob(str(timing_file(Path(), run, "*"))))


def read_timings(out: Path, run: str) -> list[dict] | None:
    """The run's timings, one a process that made images; None where one cannot be read (torn by an
    interrupt: agentsd wrote them in place before it wrote them whole)."""
    timings = []
    for path in timing_files(out, run):
        try:
            timing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: not UTF-8, or not JSON
            return None
        if not (isinstance(timing, dict) and TIMING_KEYS <= timing.keys()):
            return None
        timings.append(timing)
    return timings


def dtype_name(pipe) -> str:
    return str(pipe.unet.dtype).removeprefix("torch.")


def image_metadata(args, pipe, method: str, settings: dict) -> dict:
    """What a run's images are made with, as their PNGs record it (with each image's prompt and seed)."""
    deepcache = args.deepcache_interval if uses_deepcache(method) else None
    return dict(model=args.model, method=method, steps=args.steps, guidance=args.guidance,
                scheduler=type(pipe.scheduler).__name__, dtype=dtype_name(pipe), settings=settings,
                deepcache=deepcache)  # fmt: skip


def check_earlier_images(out: Path, args, pipe, runs, jobs) -> None:
    """An interrupted run resumes from the images it left in --out; images that another setting made there
    (another model, steps, size, ratio...) would enter this run's scores unseen: an error instead."""
    for name, method, settings in runs:
        # as the PNGs hold it (JSON), with the images' size
        made = json.loads(json.dumps(dict(image_metadata(args, pipe, method, settings), size=[args.width, args.height])))
        for job in jobs:
            path = image_file(out, name, job)
            if not path.exists():
                continue
            expected = dict(prompt=job.prompt, seed=job.seed, **made)
            found = recorded_settings(out, path)
            different = next((key for key in expected if found.get(key) != expected[key]), None)
            if different:
                option = f" ({OPTIONS_OF_RECORD[different]})" if different in OPTIONS_OF_RECORD else ""
                made_with = (f"was made with {different} {found[different]!r}" if different in found
                             else f"records no {different} (an earlier agentsd's, or not agentsd's)")  # fmt: skip
                raise BenchmarkError(f"--out {out}: {path} {made_with}, this run has {expected[different]!r}"
                                     f"{option}; give another --out, or remove {path.parent} to make its images "
                                     "again")  # fmt: skip


def recorded_settings(out: Path, path: Path) -> dict:
    """What an image in --out records it was made with, and its size; an error naming it if it cannot be read."""
    try:
        with Image.open(path) as image:
            found = dict(json.loads(image.info.get("agentsd", "{}")), size=list(image.size))
            image.verify()  # to its end: a truncated PNG opens, and fails only where it is measured
    except (OSError, SyntaxError, TypeError, ValueError) as error:  # PIL says SyntaxError for a broken PNG
        raise BenchmarkError(f"--out {out}: cannot read the image {path} ({type(error).__name__}: {error}); remove "
                             "it to make it again") from None  # fmt: skip
    return found


def check(args) -> list[tuple[str, str, dict]]:
    """Every input checked before anything is written: (run name, method, apply_patch settings)."""
    if args.num_images < 1 or args.batch_size < 1 or args.images_per_class < 1:
        raise BenchmarkError("--num-images, --batch-size and --images-per-class must be at least 1")
    if "baseline" not in args.methods:
        args.methods = ["baseline", *args.methods]  # speed-ups and paired scores are against it
    runs = []
    for method in dict.fromkeys(args.methods):
        if uses_deepcache(method):
            try:
                check_deepcache_installed()
            except ImportError as error:
                raise BenchmarkError(f"--methods {method}: {error}") from None
        for ratio in [0.0] if method in UNPATCHED_METHODS else args.ratios:
            try:
                settings = patch_settings(method, ratio, seed=args.seed, min_tokens=args.min_tokens)
            except (TypeError, ValueError) as error:
                raise BenchmarkError(f"--ratios {ratio:g} (--methods {method}): {error}") from None
            name = method if method in UNPATCHED_METHODS else f"{method}-{ratio:g}"
            if any(name == earlier for earlier, _, _ in runs):  # one images folder, scored twice
                raise BenchmarkError(f"--ratios {ratio!r} gives the run {name} a second time (ratios equal to 6 "
                                     "significant digits share its images); give each ratio once")  # fmt: skip
            runs.append((name, method, settings))
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        except (OSError, UnicodeDecodeError) as error:
            raise BenchmarkError(f"--prompts-file {path}: cannot read it as UTF-8 ({type(error).__name__})") from None
        if not [line for line in lines if line.strip()]:
            raise BenchmarkError(f"--prompts-file {path} is missing or has no prompts (one a line)")
    if args.no_fid:
        fid_options = {"--real-dir": args.real_dir, "--real-stats": args.real_stats, "--features": args.features,
                       "--inception-weights": args.inception_weights}  # fmt: skip
        given = [option for option, value in fid_options.items() if value is not None]
        if given:
            raise BenchmarkError(f"--no-fid excludes {', '.join(given)}: it measures no FID, so it takes no real "
                                 "images or feature network")  # fmt: skip
    else:
        if args.real_dir is None and args.real_stats is None:
            raise BenchmarkError("FID needs --real-dir or --real-stats (or --no-fid to only generate and time)")
        if args.real_dir is not None and not _image_files(Path(args.real_dir)):
            raise BenchmarkError(f"--real-dir {args.real_dir} does not exist or holds no images")
        if args.real_stats is not None:
            read_real_statistics(Path(args.real_stats))
    return runs


def read_real_statistics(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """mu (d,) and sigma (d, d) of a pytorch-fid .npz, or BenchmarkError naming --real-stats."""
    try:
        with np.load(path) as stats:
            mu, sigma = np.asarray(stats["mu"], dtype=np.float64), np.asarray(stats["sigma"], dtype=np.float64)
    except FileNotFoundError:
        raise BenchmarkError(f"--real-stats {path} does not exist") from None
    except (OSError, ValueError, KeyError) as error:  # not an .npz, or one without mu and sigma
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise BenchmarkError(f"--real-stats {path} is not a pytorch-fid .npz with mu and sigma "
                             f"({type(error).__name__}: {reason})") from None  # fmt: skip
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 2 or sigma.shape != (d, d) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise BenchmarkError(f"--real-stats {path}: mu must be (d,) and sigma (d, d), finite; got {mu.shape} and "
                             f"{sigma.shape}")  # fmt: skip
    return mu, sigma


def prompts(args) -> list[str]:
    if args.prompts_file:
        text = Path(args.prompts_file).read_text(encoding="utf-8")  # as check() reads it, whatever the locale
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [lines[i % len(lines)] for i in range(args.num_images)]
    classes = CLASSES_FILE.read_text(encoding="utf-8").splitlines()
    return [TEMPLATE.format(classes[(i // args.images_per_class) % len(classes)]) for i in range(args.num_images)]


def image_file(out: Path, run: str, job) -> Path:
    return out / "images" / run / f"{job.index:05d}.png"


def _save(out: Path, run: str, job, image, metadata):
    save_png(image_file(out, run, job), image, dict(prompt=job.prompt, seed=job.seed, **metadata))


def make_fid(args, feature, device):
    """(torchmetrics' FID with the pytorch-fid Inception, or with `feature` or --features; what it uses)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature is not None:
        features = f"{type(feature).__module__}.{type(feature).__qualname__} (passed to run)"
    elif args.features:
        try:
            feature = load_feature_network(args.features)
        except ValueError as error:
            raise BenchmarkError(str(error)) from None
        features = f"--features {args.features}"
    else:
        features = INCEPTION
    try:
        metric = FrechetInceptionDistance(
            feature=2048 if feature is None else feature, normalize=True, reset_real_features=False,
            sync_on_compute=False,  # only the main process measures
            **({"feature_extractor_weights_path": args.inception_weights} if feature is None else {}),
        )  # fmt: skip
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if feature is not None:
            raise BenchmarkError(f"--features {args.features or features}: torchmetrics' FID does not take it "
                                 f"({reason}); it must be a torch.nn.Module mapping images (B, 3, H, W) to "
                                 "features (B, d)") from None  # fmt: skip
        raise BenchmarkError(
            f"could not load the Inception network for FID ({reason}). It needs the `fid` extra "
            '(pip install -e ".[fid]", see the README) and its weights file: download '
            f"{INCEPTION_URL} and pass it as --inception-weights, or place it in torch's hub cache "
            f"({torch.hub.get_dir()}/checkpoints/); --no-fid skips FID"
        ) from None
    return metric.to(device), features


def add_real_images(metric, args, device) -> None:
    if args.real_stats:
        mu, sigma = read_real_statistics(Path(args.real_stats))
        if mu.shape != tuple(metric.real_features_sum.shape):
            raise BenchmarkError(f"--real-stats {args.real_stats} has {mu.shape[0]} features, the FID network "
                                 f"{metric.real_features_sum.shape[0]}")  # fmt: skip
        set_real_statistics(metric, mu, sigma)
    else:
        for batch in _batches(_image_files(Path(args.real_dir)), 32):
            try:
                images = _load(batch, (args.width, args.height), device)
            except OSError as error:  # PIL's UnidentifiedImageError and truncated files
                raise BenchmarkError(f"--real-dir {args.real_dir}: cannot read an image ({error})") from None
            metric.update(images, real=True)


def set_real_statistics(metric, mu, sigma) -> None:
    """Put pytorch-fid statistics into a FrechetInceptionDistance, inverting what its compute() reads."""
    n = 2  # any count > 1 gives back exactly this mean and covariance
    mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64, device=metric.device)
    sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64, device=metric.device)
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, device=metric.device)


def real_statistics(metric) -> tuple[np.ndarray, np.ndarray]:
    n = metric.real_features_num_samples
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance of two Gaussians, by torchmetrics' FID formula."""
    from torchmetrics.image.fid import _compute_fid

    as64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    return float(_compute_fid(as64(mu1), as64(sigma1), as64(mu2), as64(sigma2)))


def measure(args, runs, jobs, metric, device) -> list[dict]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    out = Path(args.out)
    lpips = _lpips(device)
    results = []
    for name, method, settings in runs:
        timings = read_timings(out, name) or []  # written whole just now
        seconds, images = sum(t["seconds"] for t in timings), sum(t["images"] for t in timings)
        peaks = [t["peak_gb"] for t in timings if t["peak_gb"] is not None]
        row = dict(run=name, method=method, ratio=settings.get("ratio", 0.0), images=len(jobs),
                   s_per_image=seconds / images if images else None, gb_per_image=max(peaks) if peaks else None)  # fmt: skip
        files = [image_file(out, name, job) for job in jobs]
        base = [image_file(out, "baseline", job) for job in jobs]
        if metric is not None:
            metric.reset()
        psnr = ssim = lp = 0.0
        for batch, base_batch in zip(_batches(files, 32), _batches(base, 32)):
            images = _load(batch, None, device)
            if metric is not None:
                metric.update(images, real=False)
            if method != "baseline":
                reference = _load(base_batch, None, device)
                psnr += float(peak_signal_noise_ratio(images, reference, data_range=1.0, dim=(1, 2, 3))) * len(batch)
                ssim += float(structural_similarity_index_measure(images, reference, data_range=1.0)) * len(batch)
                lp += float(lpips(images, reference)) * len(batch) if lpips else 0.0
        row["fid"] = float(metric.compute()) if metric is not None else None
        paired = method != "baseline"
        row.update(psnr=psnr / len(jobs) if paired else None, ssim=ssim / len(jobs) if paired else None,
                   lpips=lp / len(jobs) if paired and lpips else None)  # fmt: skip
        results.append(row)
    baseline = results[0]
    for row in results:
        row["speedup"] = _ratio(baseline["s_per_image"], row["s_per_image"])
        row["memory_saving"] = _ratio(baseline["gb_per_image"], row["gb_per_image"])
    if metric is not None:
        mu, sigma = real_statistics(metric)
        np.savez(out / "real_stats.npz", mu=mu, sigma=sigma)  # pytorch-fid format: --real-stats next time
    return results


def setup(args, pipe, features: str | None) -> dict:
    """What the results depend on, written beside them."""
    if features is None:
        real = None
    elif args.real_stats:
        real = f"--real-stats {args.real_stats}"
    else:
        real = f"--real-dir {args.real_dir} ({len(_image_files(Path(args.real_dir)))} images)"
    if args.prompts_file:
        prompt_source = f"--prompts-file {args.prompts_file}"
    else:
        prompt_source = f"{TEMPLATE!r} over the ImageNet-1k classes, {args.images_per_class} per class"
    return dict(
        model=args.model, steps=args.steps, scheduler=type(pipe.scheduler).__name__, guidance=args.guidance,
        height=args.height, width=args.width, dtype=dtype_name(pipe),
        device=str(pipe.device), batch_size=args.batch_size, seed=args.seed, num_images=args.num_images,
        prompts=prompt_source, features=features or "none (--no-fid)", real=real, versions=versions(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=getattr(args, "command", None),
    )  # fmt: skip


def write_results(out: Path, results: list[dict], setup: dict) -> None:
    """results.csv (one row a run, with the setting columns), .json ({setup, results}), .md, and the plot."""
    fields = ["run", "method", "ratio", "images", "fid", "s_per_image", "gb_per_image", "speedup", "memory_saving",
              "psnr", "ssim", "lpips"]  # fmt: skip
    per_row = {key: setup[key] for key in ("model", "steps", "scheduler", "guidance", "height", "width", "features")}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields + list(per_row))
    writer.writeheader()
    writer.writerows(dict(row, **per_row) for row in results)
    write_whole(out / "results.csv", table.getvalue())
    write_whole(out / "results.json", json.dumps({"setup": setup, "results": results}, indent=1))
    write_whole(out / "results.md", setup_markdown(setup) + "\n" + markdown(results))
    if any(row["fid"] is not None for row in results):
        plot(results, out / PLOT)
    else:
        print(f"No {PLOT}: it plots FID against seconds per image, and this run has no FID (--no-fid).")
    print(markdown(results))


def setup_markdown(setup: dict) -> str:
    lines = [f"- {key}: {value}" for key, value in setup.items() if key != "versions"]
    lines.append("- versions: " + ", ".join(f"{name} {v}" for name, v in setup["versions"].items() if v))
    return "\n".join(lines) + "\n"


def markdown(results: list[dict]) -> str:
    fmt = lambda v, spec, unit="": "n/a" if v is None else format(v, spec) + unit  # noqa: E731
    lines = ["| method | ratio | FID | s/image | GB/image | speed-up | memory saving | PSNR | SSIM | LPIPS |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r['method']} | {r['ratio']:g} | {fmt(r['fid'], '.2f')} | {fmt(r['s_per_image'], '.3f')} | "
            f"{fmt(r['gb_per_image'], '.2f')} | {fmt(r['speedup'], '.2f', 'x')} | {fmt(r['memory_saving'], '.2f', 'x')} | "
            f"{fmt(r['psnr'], '.2f')} | {fmt(r['ssim'], '.3f')} | {fmt(r['lpips'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method and r["fid"] is not None and r["s_per_image"]]
        if rows:
            ax.plot([r["s_per_image"] for r in rows], [r["fid"] for r in rows], marker="*" if method == "baseline" else "o",
                    label=method)  # fmt: skip
            for r in rows:
                if method != "baseline":
                    ax.annotate(f"{r['ratio']:g}", (r["s_per_image"], r["fid"]), fontsize=7)
    ax.set_xlabel("seconds per image")
    ax.set_ylabel("FID")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lpips(device):
    try:  # needs torchvision and downloadable AlexNet weights
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)
    except Exception:
        return None


def _ratio(base, value):
    return base / value if base and value else None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in IMAGE_SUFFIXES) if folder.is_dir() else []


def _batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _load(paths, size, device) -> torch.Tensor:
    """Images as float (B, 3, H, W) in [0, 1]; real ones center-cropped and resized to `size`."""
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if size is not None:
            image = ImageOps.fit(image, size, Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(images).to(device).float() / 255


if __name__ == "__main__":
    main()
