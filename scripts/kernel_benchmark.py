"""Time of each kernel phase of one block (its merge plan, merge and unmerge), at the shapes of SD 1.5
level 1 (batch 2, 320 channels, fp16; agent stage sx=sy=4, ToMe stage sx=sy=2, ratio 0.4): GPU time
inside a CUDA graph, and host time per eager call at 4096 tokens (where eager UNet calls are
host-bound). The plan with the one-program selection (used up to kernels.layout.ONE_PROGRAM_MAX_TOKENS) is
timed up to 9216 tokens.

    python scripts/kernel_benchmark.py
    python scripts/kernel_benchmark.py --channels 640 --max-tokens 4096    # SDXL 1024px, level 2
"""

import argparse

import torch

from agentsd import kernels
from timing import cuda_graph, host_us, median_ms

# (tokens, cell size, t, t_a or None): the agent and ToMe stages at 512, 768, 1024 and 2048px
SHAPES = [(4096, 4, 1638, 3840), (4096, 2, 1638, None), (9216, 4, 3686, 8640), (9216, 2, 3686, None),
          (16384, 4, 6553, 15360), (16384, 2, 6553, None), (65536, 4, 26214, 61440), (65536, 2, 26214, None)]  # fmt: skip


def graph_us(fn, inner=10, reps=20):
    """Median GPU microseconds of fn, replayed from a CUDA graph of `inner` calls."""
    return median_ms(cuda_graph(fn, inner).replay, reps) * 1e3 / inner


def selection_up_to(max_tokens: int) -> None:
    """Plans from now on select in one program up to `max_tokens` tokens (layouts anew)."""
    kernels.layout.ONE_PROGRAM_MAX_TOKENS = max_tokens
    kernels.layout.layout_for.cache_clear()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--max-tokens", type=int, default=65536)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    default_max = kernels.layout.ONE_PROGRAM_MAX_TOKENS
    timestep = torch.tensor(981.0, device="cuda")
    for n_tokens, cell, t, t_a in [shape for shape in SHAPES if shape[0] <= args.max_tokens]:
        side = int(n_tokens**0.5)
        x = (torch.randn(2, n_tokens, args.channels, device="cuda") * 20).half()
        # The UNet's block inputs share a large common direction: their scores crowd near 1.
        crowded = x + 60 * torch.randn(args.channels, device="cuda").half()
        plan = lambda x=x: kernels.plan(x, side, cell, cell, 1, t, t_a, seed=0, timestep=timestep)  # noqa: E731
        block_plan = plan()
        y = x[:, : n_tokens - t].contiguous()
        print(f"N={n_tokens} C={args.channels} cell={cell} D={block_plan.shape.num_dst} t={t} t_a={t_a}")
        steps = [
            (0, "plan, radix selection", plan),
            (10**9, "plan, one-program selection", plan),
            (10**9, "plan, one-program selection, crowded scores", lambda: plan(crowded)),
            (default_max, "merge", lambda: kernels.merge(x, block_plan, t_a is not None)),
            (default_max, "unmerge", lambda: kernels.unmerge(y, block_plan)),
        ]
        for max_tokens, name, fn in steps:
            if "one-program" in name and n_tokens > 9216:
                continue
            selection_up_to(max_tokens)
            host = f", host {host_us(fn):.0f} us" if n_tokens == 4096 else ""
            print(f"  {name}: {graph_us(fn):.1f} us{host}", flush=True)
        selection_up_to(default_max)


if __name__ == "__main__":
    main()
