"""Whole generations as users run them: seconds per image (the first image of a fresh process, and the
steady state), speed-up and peak GPU memory of agentsd against the baseline and its peers.

    agentsd benchmark speed                                    # every config, eager, 3 rounds
    agentsd benchmark speed --configs sd15-1024 --modes eager compile --rounds 5
    agentsd benchmark speed --methods baseline agentsd deepcache agentsd+deepcache

Each method runs on a pipeline of its own (its own copy of the UNet and its own scheduler; the VAE is
shared), patched once, as a user does. Rounds take the methods in turn, in a rotating order, so that
the host's drift hits all alike: steady seconds are the median over rounds, and a speed-up is the
median over rounds of the baseline's time over the method's in the same round. The first image is
timed in a fresh process per method (building the model excluded; kernel tuning, compiling and the
first calls of every library included), once with empty caches (a new machine) and once more with
the caches the first left (every later run). Random weights of the public configs (speed does not
depend on them), prompt embeddings passed in, fp16, guidance 7.5 (a CFG batch of 2), the VAE decode
included. Without CUDA it runs a tiny configuration on the CPU, so that CI keeps it working.
"""

import argparse
import copy
import csv
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .environment import package_version, versions
from .files import write_whole
from .kernels import tuning_seconds
from .models import CONTEXT, TINY_UNET_CONFIGS, random_pipeline, tiny_pipeline
from .options import check_output_folder, folder, make_output_folder, removed_if_failing
from .patch import apply_patch
from .schedule import TRAIN_TIMESTEPS

# config: (model, size, steps); the steps of the issue that set the targets (20 at 2048px, where one
# image takes seconds)
CONFIGS = {
    "sd15-512": ("sd15", 512, 50), "sd15-768": ("sd15", 768, 50), "sd15-1024": ("sd15", 1024, 50),
    "sd15-2048": ("sd15", 2048, 20), "sdxl-1024": ("sdxl", 1024, 50), "sdxl-2048": ("sdxl", 2048, 20),
}  # fmt: skip
DEFAULT_CONFIGS = ["sd15-512", "sd15-1024", "sd15-2048", "sdxl-1024", "sdxl-2048"]
TINY = ("sd15", 64, 4)  # the CPU's configuration
# method: what is applied to its pipeline, in order
METHODS = {
    "baseline": (),
    "agentsd": ("agentsd",),  # apply_patch's defaults: the paper's schedule at ratio 0.4
    "agentsd-tome": ("agentsd-tome",),  # plain ToMe, ratio 0.5
    "tomesd": ("tomesd",),  # the public tomesd 0.1.3, ratio 0.5
    "deepcache": ("deepcache",),
    "agentsd+deepcache": ("agentsd", "deepcache"),
}
COMPILABLE = ("baseline", "agentsd", "agentsd-tome")  # tomesd draws random numbers with a generator; DeepCache wraps forwards
# mode: torch.compile's mode for the whole UNet; compile-regional is diffusers' regional compilation
# (unet.compile_repeated_blocks: each transformer block on its own, far less to compile)
MODES = {"eager": None, "compile": "default", "compile-ro": "reduce-overhead", "compile-regional": "default"}
PACKAGES = {"tomesd": "tomesd", "deepcache": "DeepCache"}
OUTPUTS = ("results.md", "results.json", "results.csv", "speed.png")  # rewritten after each config


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=sorted(CONFIGS), metavar="CONFIG",
                        help=f"model and size: {', '.join(CONFIGS)}")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                        help=f"{', '.join(METHODS)} (the baseline is always run)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=list(MODES), metavar="MODE",
                        help="eager, compile (torch.compile's default mode), compile-ro (reduce-overhead), "
                        "compile-regional (diffusers' compile_repeated_blocks)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 50, 20 at 2048px)")
    parser.add_argument("--rounds", type=int, default=3, help="steady-state images per method")
    parser.add_argument("--deepcache-interval", type=int, default=3, help="DeepCache's cache interval")
    parser.add_argument("--first-image-methods", nargs="*", choices=list(METHODS), metavar="METHOD",
                        help="methods whose first image is timed in fresh processes (default: baseline and agentsd "
                             "where they run; the option alone: none)")  # fmt: skip
    parser.add_argument("--out", type=folder, help="a folder for the results (default: outputs/speed/DATE-TIME, "
                        "new each run; one holding an earlier run's results is refused)")
    parser.add_argument("--first-image", nargs=3, metavar=("CONFIG", "METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is not None and not 1 <= args.steps < TRAIN_TIMESTEPS:  # pipelines.max_steps of every config
        parser.error(f"--steps must be in [1, {TRAIN_TIMESTEPS - 1}], got {args.steps}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.deepcache_interval < 1:
        parser.error(f"--deepcache-interval must be at least 1, got {args.deepcache_interval}")
    args.methods = list(dict.fromkeys(["baseline", *args.methods]))
    if args.first_image_methods is None:
        args.first_image_methods = [m for m in ("baseline", "agentsd") if m in args.methods]
    for method in args.first_image_methods:  # first images are taken of the methods that run
        if method not in args.methods:
            parser.error(f"--first-image-methods {method}: not among --methods ({' '.join(args.methods)}); add it there")
    for method in dict.fromkeys([*args.methods, *args.first_image_methods]):
        for step in METHODS[method]:
            package = PACKAGES.get(step.split("-")[0])
            if package and importlib.util.find_spec(package) is None:
                extra = "deepcache" if package == "DeepCache" else "test"
                parser.error(f"--methods {method} needs the {package} package: pip install \"agentsd[{extra}]\"")
    args.out = args.out or time.strftime("outputs/speed/%Y%m%d-%H%M%S")
    try:
        check_output_folder(Path(args.out))
    except ValueError as error:
        parser.error(f"--out: {error}")
    earlier = [name for name in OUTPUTS if (Path(args.out) / name).exists()]
    if earlier and not args.first_image:  # a second run would replace the first's results
        parser.error(f"--out {args.out} holds the results of an earlier run ({', '.join(earlier)}): pass another "
                     "--out, or remove them")  # fmt: skip
    return args


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    started = time.perf_counter()
    if args.first_image:  # a child process: one first image
        print(json.dumps(first_image(*args.first_image, args)), flush=True)
        return
    try:  # the results are written after the first config: an --out that cannot be made fails now
        made = make_output_folder(Path(args.out))
    except ValueError as error:
        argparse.ArgumentParser(prog=prog).error(f"--out: {error}")
    cuda = torch.cuda.is_available()
    configs = args.configs if cuda else ["tiny"]
    modes = args.modes if cuda else ["eager"]
    if not cuda:
        print("No CUDA here: the tiny configuration, eager, on the CPU (--configs and --modes apply on a GPU)", file=sys.stderr)
    rows, head = [], header(argv)
    with removed_if_failing(Path(args.out), made):
        for config in configs:
            for mode in modes:
                methods = [m for m in args.methods if mode == "eager" or m in COMPILABLE]
                new = steady_rows(config, mode, methods, args)
                torch.cuda.empty_cache() if cuda else None  # the config's pipelines are gone
                for row in new:
                    if row["method"] in args.first_image_methods:
                        row.update(first_images(config, row["method"], mode, args))
                        print(json.dumps(row), flush=True)
                rows += new
                write_outputs(Path(args.out), rows, head)  # after each config: a run cut short keeps what it measured
    print(markdown(rows, head))
    print(f"({time.perf_counter() - started:.0f} s; results in {args.out})")


# ---------------------------------------------------------------- pipelines


def base_pipeline(config: str, device: torch.device):
    """(pipeline with random weights, size, steps, call arguments) of a config."""
    if config == "tiny":
        kind, size, steps = TINY
        pipe = tiny_pipeline(kind)
        width, dtype = TINY_UNET_CONFIGS[kind]["cross_attention_dim"], torch.float32
    else:
        kind, size, steps = CONFIGS[config]
        dtype = torch.float16
        pipe = random_pipeline(kind, device=device, dtype=dtype)
        width = CONTEXT[kind][1]
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    embeds = dict(prompt_embeds=torch.randn(1, 77, width, generator=g), negative_prompt_embeds=torch.randn(1, 77, width, generator=g))
    if kind == "sdxl":
        unet = pipe.unet.config
        pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
        embeds.update(pooled_prompt_embeds=torch.randn(1, pooled, generator=g), negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    call = dict(height=size, width=size, guidance_scale=7.5, output_type="pt", **{k: v.to(device, dtype) for k, v in embeds.items()})
    return pipe, steps, call


def method_pipeline(base, method: str, mode: str, args):
    """A pipeline of `method`: its own UNet and scheduler, the base's VAE; patched, then compiled."""
    pipe = type(base)(**{**base.components, "unet": copy.deepcopy(base.unet), "scheduler": copy.deepcopy(base.scheduler)})
    pipe.set_progress_bar_config(disable=True)
    for step in METHODS[method]:
        if step == "agentsd":
            apply_patch(pipe, seed=0)
        elif step == "agentsd-tome":
            apply_patch(pipe, ratio=0.5, sx=2, sy=2, agent_ratio=0.0, seed=0)
        elif step == "tomesd":
            import tomesd

            tomesd.apply_patch(pipe, ratio=0.5)
        elif step == "deepcache":
            from .pipelines import enable_deepcache

            pipe._deepcache = enable_deepcache(pipe, args.deepcache_interval)
    if mode == "compile-regional":
        pipe.unet.compile_repeated_blocks(mode=MODES[mode], fullgraph=True)
    elif MODES[mode] is not None:
        pipe.unet = torch.compile(pipe.unet, mode=MODES[mode], fullgraph=True)
    return pipe


def generate(pipe, steps: int, call: dict, memory: dict | None = None) -> torch.Tensor:
    """One image; with `memory`, the peak GB of the denoising loop and of the decode, above what was
    held before the call."""
    cuda = pipe.device.type == "cuda"
    if memory is not None and cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def at_step(pipeline, step, timestep, tensors):
        if memory is not None and cuda and step == pipeline.num_timesteps - 1:  # the loop's last step
            memory["loop_gb"] = (torch.cuda.max_memory_allocated() - held) / 2**30
            torch.cuda.reset_peak_memory_stats()
        return tensors

    images = pipe(num_inference_steps=steps, generator=torch.Generator(pipe.device).manual_seed(0), callback_on_step_end=at_step, **call).images
    if memory is not None and cuda:
        memory["decode_gb"] = (torch.cuda.max_memory_allocated() - held) / 2**30
    return images


def timed(fn) -> float:
    cuda = torch.cuda.is_available()
    torch.cuda.synchronize() if cuda else None
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize() if cuda else None
    return time.perf_counter() - start


# ---------------------------------------------------------------- steady state


@torch.no_grad()
def steady_rows(config: str, mode: str, methods: list[str], args) -> list[dict]:
    """One row per method: median seconds per image, paired speed-up, memory, finite outputs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # a UNet copy per method
    base, steps, call = base_pipeline(config, device)
    steps = args.steps or steps
    pipes = {m: method_pipeline(base, m, mode, args) for m in methods}
    weights_gb = sum(p.numel() * p.element_size() for m in (base.unet, base.vae) for p in m.parameters()) / 2**30
    rows = {m: dict(config=config, mode=mode, method=m, steps=steps, seconds=[], weights_gb=weights_gb) for m in methods}
    for method, pipe in pipes.items():  # warm-up, the finite check and memory, one method at a time
        row, outputs, tuned = rows[method], [], tuning_seconds()
        row["warmup_s"] = timed(lambda: outputs.append(generate(pipe, steps, call)))
        row["warmup_tuning_s"] = tuning_seconds() - tuned
        row["finite"] = bool(torch.isfinite(outputs[0]).all())
        # memory of a warm image: the warm-up's peaks hold kernel tuning and CUDA graph recording
        generate(pipe, steps, call, memory=row)
    for round_ in range(args.rounds):
        order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]
        for method in order:
            rows[method]["seconds"].append(timed(lambda: generate(pipes[method], steps, call)))
    baseline = rows["baseline"]["seconds"]
    for row in rows.values():
        row["s_per_image"] = statistics.median(row["seconds"])
        ratios = [b / s for b, s in zip(baseline, row["seconds"])]
        row.update(speedup=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios))
        print(json.dumps(row), flush=True)
    return list(rows.values())


# ---------------------------------------------------------------- first image


def first_images(config: str, method: str, mode: str, args) -> dict:
    """Seconds of the first image of a fresh process, with empty caches and then with the caches it left."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="agentsd-caches-") as caches:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{caches}/triton", AGENTSD_CACHE_DIR=f"{caches}/agentsd",
                   TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor")  # fmt: skip
        command = [sys.executable, "-m", "agentsd.speed_benchmark", "--first-image", config, method, mode,
                   "--deepcache-interval", str(args.deepcache_interval), "--methods", method]  # fmt: skip
        command += [] if args.steps is None else ["--steps", str(args.steps)]
        for caches_state in ("first_image_cold", "first_image"):  # empty caches, then the ones it left
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                result[f"{caches_state}_s"] = None
                result["first_image_error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
                break
            child = json.loads(done.stdout.strip().splitlines()[-1])
            result[f"{caches_state}_s"], result[f"{caches_state}_tuning_s"] = child["seconds"], child["tuning_s"]
    return result


@torch.no_grad()
def first_image(config: str, method: str, mode: str, args) -> dict:
    """In a fresh process: build (not timed), patch and compile, then time the first image."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, steps, call = base_pipeline(config, device)
    pipe = method_pipeline(base, method, mode, args)
    seconds = timed(lambda: generate(pipe, args.steps or steps, call))
    return dict(seconds=seconds, tuning_s=tuning_seconds())


# ---------------------------------------------------------------- outputs


def header(argv, program: str = "agentsd benchmark speed") -> dict:
    """Where and how a result was measured: GPU, versions, commit, date and the command line."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return dict(
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        **versions(), triton=package_version("triton"),
        commit=commit.stdout.strip() if commit.returncode == 0 else None,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=f"{program} " + " ".join(sys.argv[1:] if argv is None else argv),
    )  # fmt: skip


def provenance(head: dict) -> str:
    """header() as the first line of a markdown result."""
    return (f"{head['gpu']}; torch {head['torch']}, diffusers {head['diffusers']}, Triton {head['triton']}, "
            f"agentsd {head['agentsd']} ({head['commit']}); {head['date']}")  # fmt: skip


COLUMNS = ["config", "mode", "method", "steps", "s_per_image", "speedup", "speedup_min", "speedup_max",
           "first_image_s", "first_image_cold_s", "first_image_tuning_s", "first_image_cold_tuning_s", "loop_gb",
           "decode_gb", "weights_gb", "finite", "warmup_s", "warmup_tuning_s"]  # fmt: skip


def write_outputs(out: Path, rows: list[dict], head: dict) -> None:
    """OUTPUTS in `out`, each written whole (temporary file, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    contents = [markdown(rows, head), json.dumps(dict(header=head, rows=rows), indent=1), _csv(rows), plot(rows, head)]
    for name, content in zip(OUTPUTS, contents, strict=True):
        write_whole(out / name, content)


def markdown(rows: list[dict], head: dict) -> str:
    lines = [provenance(head), "", f"`{head['command']}`", "",
             "| config | mode | method | steps | s/image | speed-up (min-max) | first image (new machine) | "
             "warm-up (tuning) | loop / decode peak GB | finite |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        first = "" if "first_image_s" not in r else f"{_s(r['first_image_s'])} ({_s(r['first_image_cold_s'])})"
        warmup = f"{_s(r['warmup_s'])} ({_s(r['warmup_tuning_s'])})"
        memory = f"{r['loop_gb']:.2f} / {r['decode_gb']:.2f}" if "loop_gb" in r else "n/a"
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['method']} | {r['steps']} | {r['s_per_image']:.3f} | "
            f"{r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {first} | {warmup} | {memory} | "
            f"{'yes' if r['finite'] else 'NO'} |"
        )
    lines += ["", "Speed-up: the median over rounds of the baseline's seconds over the method's in the same round. "
              "Memory: peaks of the image after the warm-up, above what was held before it. First image: a fresh "
              "process, model building excluded; in brackets with empty kernel and compile caches. Warm-up: this "
              "process's first image (compiling included), in brackets its seconds of kernel tuning."]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], head: dict) -> bytes:
    """A bar chart of the speed-ups, one group per config, one panel per mode, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    methods = [m for m in METHODS if m != "baseline" and any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 + 3 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        configs = list(dict.fromkeys(r["config"] for r in rows if r["mode"] == mode))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            values = [next((r["speedup"] for r in rows if (r["config"], r["mode"], r["method"]) == (c, mode, method)), 0) for c in configs]
            ax.bar([x + i * width for x in range(len(configs))], values, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(configs))], configs)
        ax.set_ylabel("speed-up over the baseline (whole generation)")
        ax.set_title(mode)
    if methods:  # the baseline alone has no bars to name
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{head['gpu']}, {head['date'][:10]}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def _csv(rows: list[dict]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _s(seconds) -> str:
    return "fails" if seconds is None else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()
