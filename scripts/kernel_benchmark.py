"""Time of each kernel step of one block's merge plan and merge, at the shapes of SD 1.5 level 1
(batch 2, 320 channels, fp16; agent stage sx=sy=4, ToMe stage sx=sy=2, ratio 0.4): GPU time inside a
CUDA graph, and host time per eager call at 4096 tokens (where eager UNet calls are host-bound).
The one-program selection (used up to kernels.ONE_PROGRAM_MAX_TOKENS) is timed up to 9216 tokens.

    python scripts/kernel_benchmark.py
"""

import torch

from agentsd import kernels, merge
from timing import cuda_graph, host_us, median_ms

# (tokens, cell size, t, t_a or None): the agent and ToMe stages at 512, 768, 1024 and 2048px
SHAPES = [(4096, 4, 1638, 3840), (4096, 2, 1638, None), (9216, 4, 3686, 8640), (9216, 2, 3686, None),
          (16384, 4, 6553, 15360), (16384, 2, 6553, None), (65536, 4, 26214, 61440), (65536, 2, 26214, None)]  # fmt: skip


def graph_us(fn, inner=10, reps=20):
    """Median GPU microseconds of fn, replayed from a CUDA graph of `inner` calls."""
    return median_ms(cuda_graph(fn, inner).replay, reps) * 1e3 / inner


def main():
    torch.manual_seed(0)
    for n_tokens, cell, t, t_a in SHAPES:
        side = int(n_tokens**0.5)
        x = (torch.randn(2, n_tokens, 320, device="cuda") * 20).half()
        dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
        num_dst = dst.index.numel()
        score, best = kernels.best_destination(x, dst.index, side, cell, cell)
        # The UNet's block inputs share a large common direction: their scores crowd near 1.
        crowded = kernels.best_destination(x + 60 * torch.randn(320, device="cuda").half(), dst.index, side, cell, cell)[0]

        def assign(one_program_max, score=score):
            kernels.ONE_PROGRAM_MAX_TOKENS = one_program_max
            return kernels.assign_slots(score, best, dst.is_dst, dst.slot, num_dst, t, t_a)

        slot, agent_slot = assign(0)
        steps = {
            "best_destination": lambda: kernels.best_destination(x, dst.index, side, cell, cell),
            "assign_slots, radix launches": lambda: assign(0),
            "assign_slots, one program": lambda: assign(10**9),
            "assign_slots, one program, crowded scores": lambda: assign(10**9, crowded),
            "merge_mean": lambda: kernels.merge_mean(
                x, slot, agent_slot, dst.index, dst.is_dst, n_tokens - t, n_tokens - t_a if t_a else None
            ),
            "unmerge (gather)": lambda: x[:, : n_tokens - t].gather(1, slot.unsqueeze(-1).expand(2, n_tokens, 320)),
        }
        print(f"N={n_tokens} cell={cell} D={num_dst} t={t} t_a={t_a}")
        for name, fn in steps.items():
            if "one program" in name and n_tokens > 9216:
                continue
            host = f", host {host_us(fn):.0f} us" if n_tokens == 4096 else ""
            print(f"  {name}: {graph_us(fn):.1f} us{host}", flush=True)


if __name__ == "__main__":
    main()
