"""The `agentsd` command: `agentsd generate ...` makes images, `agentsd benchmark ...` runs the FID benchmark."""

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import ATTN_PRECISIONS, MAX_DOWNSAMPLES
from .generate import Job, generate_images, save_png
from .pipelines import DEFAULT_MODEL, DTYPES, METHODS, SCHEDULERS, LoadError, load_pipeline, patch_pipeline, patch_settings, resolve_device


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments that `generate` and the FID benchmark share."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id or local folder of a diffusers pipeline; 'tiny' or 'tiny-sdxl' for random tiny ones")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--height", type=int, default=None, help="default: the model's own size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the pipeline's own")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    """apply_patch's settings (default: its own defaults, the paper's schedule for agentsd)."""
    group = parser.add_argument_group("agentsd settings (see the README's apply_patch table)")
    group.add_argument("--sx", type=int)
    group.add_argument("--sy", type=int)
    group.add_argument("--agent-ratio", type=float)
    group.add_argument("--max-downsample", type=int, choices=MAX_DOWNSAMPLES)
    group.add_argument("--k-scale2", type=float)
    group.add_argument("--k-shortcut", type=float)
    group.add_argument("--attn-precision", choices=[p for p in ATTN_PRECISIONS if p])
    group.add_argument("--no-rand", dest="use_rand", action="store_false", default=None,
                       help="top-left destinations instead of random ones")
    group.add_argument("--patch-seed", type=int, help="seed of the random destinations (default: --seed)")
    group.add_argument("--merge-crossattn", action="store_true", default=None)
    group.add_argument("--merge-mlp", action="store_true", default=None)


def settings_from(args, parser) -> dict:
    """Checked apply_patch keywords for args.method, or a parser error naming the bad one."""
    names = ("sx", "sy", "agent_ratio", "max_downsample", "k_scale2", "k_shortcut", "attn_precision", "use_rand",
             "merge_crossattn", "merge_mlp")  # fmt: skip
    settings = {name: getattr(args, name) for name in names}
    settings["seed"] = args.seed if args.patch_seed is None else args.patch_seed
    try:
        return patch_settings(args.method, args.ratio, **settings)
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def read_prompts(args, parser) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            parser.error(f"--prompts-file {path} has no prompts (one a line)")
    if not prompts:
        parser.error("give at least one prompt, as arguments or with --prompts-file")
    return prompts


def generate(args, parser) -> None:
    prompts = read_prompts(args, parser)
    settings = settings_from(args, parser)
    device, dtype = resolve_device(args.device, DTYPES[args.dtype] if args.dtype else None)
    if args.batch_size < 1 or args.steps < 1:
        parser.error("--batch-size and --steps must be at least 1")
    try:
        pipe = patch_pipeline(load_pipeline(args.model, dtype=dtype, device=device, scheduler=args.scheduler), settings)
    except LoadError as error:
        parser.error(str(error))
    except (TypeError, ValueError) as error:  # a pipeline agentsd cannot patch
        parser.error(str(error))
    height = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = args.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = Path(args.out)
    common = dict(model=args.model, method=args.method, steps=args.steps, guidance=args.guidance, height=height,
                  width=width, scheduler=type(pipe.scheduler).__name__, dtype=str(dtype).removeprefix("torch."),
                  settings=settings, version=__version__)  # fmt: skip

    def save(job, image):
        save_png(out / f"{job.index:05d}.png", image, dict(prompt=job.prompt, seed=job.seed, **common))

    jobs = [Job(i, prompt, args.seed + i) for i, prompt in enumerate(prompts)]
    stats = generate_images(pipe, jobs, save=save, steps=args.steps, guidance=args.guidance, height=height,
                            width=width, batch_size=args.batch_size)  # fmt: skip
    per_image = f"{stats.seconds_per_image:.3f} s/image" if stats.seconds_per_image else "n/a"
    memory = f", peak {stats.peak_gb:.2f} GB/image" if stats.peak_gb is not None else ""
    print(f"{stats.images} images in {out}: {per_image}{memory} ({args.method}, {device})")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="agentsd", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images with baseline, ToMe or AgentSD")
    gen.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    gen.add_argument("--prompts-file", help="a text file with one prompt a line")
    gen.add_argument("--method", choices=METHODS, default="agentsd")
    gen.add_argument("--ratio", type=float, default=0.4, help="token merging ratio, in [0, 1)")
    gen.add_argument("--out", default="outputs/generate", help="folder for the PNG files")
    add_model_arguments(gen)
    add_patch_arguments(gen)
    commands.add_parser("benchmark", add_help=False, help="FID benchmark: agentsd benchmark --help")
    if argv[:1] == ["benchmark"]:
        from .fid_benchmark import main as benchmark

        return benchmark(argv[1:], prog="agentsd benchmark")
    args = parser.parse_args(argv)
    generate(args, gen)


if __name__ == "__main__":
    main()
