"""The `agentsd` command: `agentsd generate ...` makes images; `agentsd benchmark speed ...` times whole
generations against the baseline and its peers; `agentsd benchmark fid ...` runs the FID benchmark."""

import argparse
import re
import sys
from pathlib import Path

from . import __version__
from .config import ATTN_PRECISIONS, MAX_DOWNSAMPLES, RATIO
from .environment import torchvision_problem
from .options import (
    SEED_LIMIT,
    check_device,
    check_output_folder,
    finite_float,
    folder,
    guidance_scale,
    image_size,
    make_output_folder,
    nonnegative_int,
    positive_int,
    removed_if_failing,
    seed,
)
from .pipelines import DEEPCACHE_INTERVAL, DEFAULT_MODEL, DTYPES, METHODS, SCHEDULERS, UNPATCHED_METHODS, uses_deepcache

# apply_patch's keywords as options, to name the option in build_config's messages
PATCH_OPTIONS = {"agent_ratio": "--agent-ratio", "ratio": "--ratio", "sx": "--sx", "sy": "--sy",
                 "k_scale2": "--k-scale2", "k_shortcut": "--k-shortcut", "max_downsample": "--max-downsample",
                 "attn_precision": "--attn-precision", "seed": "--patch-seed", "min_tokens": "--min-tokens",
                 "use_rand": "--no-rand", "merge_crossattn": "--merge-crossattn", "merge_mlp": "--merge-mlp"}  # fmt: skip


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments that `generate` and the FID benchmark share."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id or local folder of a diffusers pipeline; 'tiny' or 'tiny-sdxl' for random tiny ones")
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=guidance_scale, default=7.5,
                        help="classifier-free guidance scale, >= 0 (up to 1: no guidance)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--height", type=image_size, default=None,
                        help="a multiple of 8 (default: the model's own size)")
    parser.add_argument("--width", type=image_size, default=None, help="a multiple of 8")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="images per pipeline call (default 1)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the pipeline's own")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N, mps, xpu (default: cuda if available, else cpu)")


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    """apply_patch's settings (default: its own defaults, the paper's schedule for agentsd)."""
    group = parser.add_argument_group("agentsd settings (see the README's apply_patch table)")
    group.add_argument("--sx", type=positive_int)
    group.add_argument("--sy", type=positive_int)
    group.add_argument("--agent-ratio", type=finite_float)
    group.add_argument("--max-downsample", type=int, choices=MAX_DOWNSAMPLES)
    group.add_argument("--k-scale2", type=finite_float)
    group.add_argument("--k-shortcut", type=finite_float)
    group.add_argument("--attn-precision", choices=[p for p in ATTN_PRECISIONS if p])
    group.add_argument("--no-rand", dest="use_rand", action="store_false", default=None,
                       help="top-left destinations instead of random ones")
    group.add_argument("--patch-seed", type=seed, help="seed of the random destinations (default: --seed)")
    group.add_argument("--merge-crossattn", action="store_true", default=None)
    group.add_argument("--merge-mlp", action="store_true", default=None)
    group.add_argument("--min-tokens", type=nonnegative_int,
                       help="merge only in blocks with at least this many tokens (default 8192; 0: everywhere)")
    group.add_argument("--deepcache", type=positive_int, metavar="N",
                       help="also DeepCache's step caching, the full UNet every N steps (--method deepcache and "
                            f"agentsd+deepcache: {DEEPCACHE_INTERVAL} unless given, DeepCache's usual setting; "
                            "needs pip install \"agentsd[deepcache]\")")  # fmt: skip


def check_model_arguments(args, parser) -> None:
    """The shared arguments that argparse cannot check alone; a parser error naming the option."""
    if args.device is not None:
        try:
            check_device(args.device)
        except ValueError as error:
            parser.error(f"argument --device: {error}")
    check_out(args, parser)


def check_out(args, parser) -> None:
    try:
        check_output_folder(Path(args.out))
    except ValueError as error:
        parser.error(f"argument --out: {error}")


def exit_if_broken_install(parser) -> None:
    """Before anything imports diffusers: a torchvision that does not match torch, in one paragraph."""
    problem = torchvision_problem()
    if problem:
        parser.error(problem)


def settings_from(args, parser) -> dict:
    """Checked apply_patch keywords for args.method, or a parser error naming the bad option."""
    from .pipelines import patch_settings

    names = ("sx", "sy", "agent_ratio", "max_downsample", "k_scale2", "k_shortcut", "attn_precision", "use_rand",
             "merge_crossattn", "merge_mlp", "min_tokens", "ratio")  # fmt: skip
    given = {name: getattr(args, name) for name in names} | {"seed": args.patch_seed}  # None: not given
    if args.method in UNPATCHED_METHODS:  # nothing is patched: a setting given would be dropped unseen
        options = [PATCH_OPTIONS[name] for name, value in given.items() if value is not None]
        if options:
            parser.error(f"argument {options[0]}: an agentsd setting, for --method tome, agentsd or agentsd+deepcache, "
                         f"not {args.method}")  # fmt: skip
    settings = given | {"seed": args.seed if args.patch_seed is None else args.patch_seed}
    ratio = settings.pop("ratio")
    try:
        return patch_settings(args.method, RATIO if ratio is None else ratio, **settings)
    except (TypeError, ValueError) as error:
        pattern = r"\b(" + "|".join(PATCH_OPTIONS) + r")\b"
        parser.error(re.sub(pattern, lambda match: PATCH_OPTIONS[match.group(1)], str(error)))


def read_prompts(args, parser) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"argument --prompts-file: {path} does not exist or is not a file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"argument --prompts-file: cannot read {path} as UTF-8 text ({type(error).__name__})")
        prompts += [line.strip() for line in lines if line.strip()]
        if not prompts:
            parser.error(f"argument --prompts-file: {path} has no prompts (one a line)")
    if not prompts:
        parser.error("give at least one prompt, as arguments or with --prompts-file")
    return prompts


def generate(args, parser) -> None:
    prompts = read_prompts(args, parser)
    if args.seed + len(prompts) > SEED_LIMIT:  # image i takes seed + i, which its metadata records
        parser.error(f"argument --seed: image i uses seed + i, below 2**63: at most 2**63 - {len(prompts)} for "
                     f"{len(prompts)} prompts, got {args.seed}")  # fmt: skip
    if args.negative_prompt is not None and args.guidance <= 1:  # diffusers ignores it without guidance
        parser.error(f"argument --negative-prompt: acts only with guidance, --guidance above 1 (got {args.guidance})")
    check_model_arguments(args, parser)
    settings = settings_from(args, parser)
    deepcache = args.deepcache
    if deepcache is None and uses_deepcache(args.method):  # the method asks for it: DeepCache's usual interval
        deepcache = DEEPCACHE_INTERVAL
    if deepcache is not None:
        from .pipelines import check_deepcache_installed

        try:
            check_deepcache_installed()
        except ImportError as error:
            parser.error(f"argument {'--deepcache' if args.deepcache else '--method'}: {error}")
    exit_if_broken_install(parser)
    import torch

    from .generate import Job, claim_png, generate_images, save_png
    from .pipelines import (LoadError, check_text_to_image, load_pipeline, max_steps, patch_pipeline, pipeline_stopped,
                            resolve_device)  # fmt: skip

    device, dtype = resolve_device(args.device, DTYPES[args.dtype] if args.dtype else None)
    try:
        pipe = load_pipeline(args.model, dtype=dtype, device=device, scheduler=args.scheduler)
        check_text_to_image(pipe)
        patch_pipeline(pipe, settings, deepcache=deepcache)
    except LoadError as error:
        parser.error(str(error))
    except (TypeError, ValueError) as error:  # a pipeline agentsd cannot patch
        parser.error(f"argument --model: {error}")
    limit = max_steps(pipe.scheduler)
    if args.steps > limit:
        parser.error(f"argument --steps: at most {limit} (the scheduler's training timesteps less one), got {args.steps}")
    height = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = args.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = Path(args.out)
    try:
        made = make_output_folder(out)
    except ValueError as error:
        parser.error(f"argument --out: {error}")
    common = dict(model=args.model, negative_prompt=args.negative_prompt, method=args.method, steps=args.steps,
                  guidance=args.guidance, height=height, width=width, scheduler=type(pipe.scheduler).__name__,
                  dtype=str(dtype).removeprefix("torch."), settings=settings, deepcache=deepcache,
                  batch_size=args.batch_size, version=__version__)  # fmt: skip

    # numbered on from the images already in --out (as CompVis' txt2img does): a second run adds, never
    # overwrites, also while it runs (claim_png)
    first = 1 + max((int(p.stem) for p in out.glob("*.png") if re.fullmatch("[0-9]+", p.stem)), default=-1)
    saved = []

    def save(job, image):
        path = claim_png(out, int(saved[-1].stem) + 1 if saved else first)
        try:
            save_png(path, image, dict(prompt=job.prompt, seed=job.seed, **common))
        except BaseException:
            path.unlink(missing_ok=True)  # the empty file that claimed the name
            raise
        saved.append(path)

    jobs = [Job(i, prompt, args.seed + i) for i, prompt in enumerate(prompts)]
    try:
        with removed_if_failing(out, made):  # before the messages below
            stats = generate_images(pipe, jobs, save=save, steps=args.steps, guidance=args.guidance, height=height,
                                    width=width, batch_size=args.batch_size,
                                    negative_prompt=args.negative_prompt)  # fmt: skip
    except ValueError as error:
        parser.error(pipeline_stopped(error, height, width, args.steps, pipe.scheduler))
    except (KeyboardInterrupt, OSError, torch.OutOfMemoryError) as error:  # say what is saved, no traceback
        if isinstance(error, KeyboardInterrupt):
            stopped = "interrupted"
        elif isinstance(error, torch.OutOfMemoryError):
            stopped = f"out of memory on {device} at --height {height} --width {width} --batch-size {args.batch_size}"
        else:  # a full disk, say
            stopped = f"cannot write in {out} ({error.strerror or error})"
        print(f"{parser.prog}: {stopped}; {len(saved)} of {len(jobs)} images saved"
              + (f" ({saved[0].name} to {saved[-1].name})" if saved else ""), file=sys.stderr)  # fmt: skip
        sys.exit(130 if isinstance(error, KeyboardInterrupt) else 1)
    per_image = f"{stats.seconds_per_image:.3f} s/image" if stats.seconds_per_image else "n/a"
    memory = f", peak {stats.peak_gb:.2f} GB/image" if stats.peak_gb is not None else ""
    noun = "image" if stats.images == 1 else "images"
    method = args.method if deepcache is None else f"{args.method}, DeepCache interval {deepcache}"
    print(f"{stats.images} {noun} in {out}: {per_image}{memory} ({method}, {device})")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """(the `agentsd` parser, its `generate` subparser)."""
    parser = argparse.ArgumentParser(prog="agentsd", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images with baseline, ToMe or AgentSD")
    gen.add_argument("prompts", nargs="*", help="prompts (or --prompts-file)")
    gen.add_argument("--prompts-file", help="a text file with one prompt a line")
    gen.add_argument("--negative-prompt", help="what no image should show (with --guidance above 1)")
    gen.add_argument("--method", choices=METHODS, default="agentsd")
    gen.add_argument("--ratio", type=finite_float, help=f"token merging ratio, in [0, 1) (default {RATIO})")
    gen.add_argument("--out", type=folder, default="outputs/generate", help="folder for the PNG files")
    add_model_arguments(gen)
    add_patch_arguments(gen)
    commands.add_parser("benchmark", add_help=False,
                        help="agentsd benchmark speed ... (whole generations) or agentsd benchmark fid ... (FID)")  # fmt: skip
    return parser, gen


BENCHMARKS = "agentsd benchmark speed ... (whole generations) or agentsd benchmark fid ... (FID; --help on either)"


def benchmark(argv: list[str]) -> None:
    """`agentsd benchmark speed ...` or `agentsd benchmark fid ...` (`agentsd benchmark --real-dir ...`, the
    FID benchmark's earlier spelling, still works)."""
    parser = argparse.ArgumentParser(prog="agentsd benchmark", usage=BENCHMARKS)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {BENCHMARKS}")
        sys.exit(0)
    if not argv or argv[0] not in ("speed", "fid") and not argv[0].startswith("-"):
        got = f", got {argv[0]!r}" if argv else ""
        parser.error(f"choose speed or fid{got}: {BENCHMARKS}")
    if argv[:1] == ["speed"]:
        from .speed_benchmark import main as speed

        return speed(argv[1:], prog="agentsd benchmark speed")
    from .fid_benchmark import main as fid

    return fid(argv[1:] if argv[:1] == ["fid"] else argv, prog="agentsd benchmark fid")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser, gen = build_parser()
    try:
        if argv[:1] == ["benchmark"]:
            return benchmark(argv[1:])
        if argv[:1] == ["generate"]:  # prompts may come before and after options
            return generate(gen.parse_intermixed_args(argv[1:]), gen)
        parser.parse_args(argv)  # --help, --version, or an error
    except KeyboardInterrupt:  # Ctrl-C before or between images (generate says what it saved)
        print("agentsd: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
