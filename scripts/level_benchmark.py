"""GPU time of the merged level's transformer blocks alone (SDXL 1024: the ten blocks at 64x64
tokens), SDPA against agentsd's stages and their free plans, in a CUDA graph and under
torch.compile (reduce-overhead by default), with where the GPU time of one compiled call goes.
In the default compile mode the blocks alone are bound by the host: their times are the host's.

A whole compiled SDXL UNet takes minutes per variant to compile; the level's blocks take seconds,
and they hold every difference between the variants (the rest of the UNet is the same code), so
`SDPA time - variant time` here is what a whole call gains.

    python scripts/level_benchmark.py --config sdxl-1024 --variants sdpa agent free-agent tome free-tome
"""

import argparse
import contextlib
import copy
import datetime
import statistics

import diffusers
import torch
from torch.profiler import ProfilerActivity, profile

from bench_processors import blocks_up_to
from speed_benchmark import ALL_VARIANTS, CONFIGS, TOP_LEVEL, in_a_row, unet_inputs, variant
from timing import cuda_graph, times_ms
from agentsd.models import unet_from_config


class Level(torch.nn.Module):
    """The transformer blocks of one level, one after another on (B, N, C) tokens (the resnets and
    projections between them, the same in every variant, left out)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x, context):
        for block in self.blocks:
            x = block(x, encoder_hidden_states=context)
        return x


def patched_level(unet, kind: str, name: str, ratio: float, sample, timestep, patched: contextlib.ExitStack) -> Level:
    """The top merged level's blocks of a copy of `unet` patched as variant `name`, which stays
    patched until `patched` closes, with the per-call state a UNet call on (sample, timestep) sets."""
    own = copy.deepcopy(unet)
    patched.enter_context(variant(own, kind, name, ratio, sample.shape[-2:]))
    patch = own.__dict__.get("_agentsd")
    if patch is not None:
        patch.before_unet(own, (sample, timestep), {})
    return Level([block for _, block in blocks_up_to(own, TOP_LEVEL[kind])])


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sdxl-1024", choices=sorted(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["sdpa", "agent", "free-agent", "tome", "free-tome"],
                        choices=[name for name in ALL_VARIANTS if name != "tomesd"])  # fmt: skip
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--modes", nargs="+", default=["graph", "compile"], choices=["graph", "compile"])
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=["default", "reduce-overhead"])
    parser.add_argument("--reps", type=int, default=30, help="timed replays of 10 calls each, per mode and variant")
    parser.add_argument("--profile", type=int, default=12, help="kernels listed per compiled variant (0: no profile)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (CUDA graphs, reduce-overhead compiles); on the CPU speed_benchmark.py runs a smoke test")

    kind, size = CONFIGS[args.config]
    unet = unet_from_config(kind).to("cuda", torch.float16).eval()
    sample, timestep, context = unet_inputs(unet, kind, size, torch.device("cuda"))[:3]
    level = TOP_LEVEL[kind]
    side = -(-size // 8 // level)
    x = torch.randn(sample.shape[0], side * side, unet.config.block_out_channels[level.bit_length() - 1], device="cuda", dtype=torch.float16)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{datetime.date.today().isoformat()}; {args.config}, level {level}: {tuple(x.shape)} tokens, "
          f"ratio {args.ratio}, compile mode {args.compile_mode}")  # fmt: skip

    calls = {}
    patched = contextlib.ExitStack()  # every variant stays patched on its own copy of the UNet until the end
    for name in args.variants:
        blocks = patched_level(unet, kind, name, args.ratio, sample, timestep, patched)
        for mode in args.modes:
            if mode == "graph":
                calls[mode, name] = cuda_graph(lambda blocks=blocks: blocks(x, context), 10).replay
                continue
            compiled = torch.compile(blocks, fullgraph=True, mode=args.compile_mode)
            run = lambda compiled=compiled: in_a_row(compiled, (x, context), 10)  # noqa: E731
            times_ms(run, 0, warmup=3)  # the first calls compile and record
            calls[mode, name] = run
            if args.profile:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    compiled(x, context)
                    torch.cuda.synchronize()
                print(f"\n== compiled {name}, one call")
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.profile, max_name_column_width=60))
    del unet

    times = {key: [] for key in calls}
    for _ in range(3):  # turns, so that the variants share the GPU's drift
        for key, call in calls.items():
            times[key] += [t / 10 for t in times_ms(call, args.reps // 3)]
    print("\n| mode | variant | ms per call of the level | gain over SDPA per call |\n|---|---|---|---|")
    for mode in args.modes:
        base = statistics.median(times[mode, "sdpa"]) if (mode, "sdpa") in times else None
        for name in args.variants:
            ms = statistics.median(times[mode, name])
            gain = f"{base - ms:+.3f} ms" if base is not None else ""
            print(f"| {mode} | {name} | {ms:.3f} | {gain} |")
    patched.close()


if __name__ == "__main__":
    main()
