# (scratch script of 2026-11-24; ONE_PROGRAM_WARPS was a module constant of agentsd/kernels.py during the sweep, not kept)
import torch
from agentsd import kernels, merge
from kernel_benchmark import graph_us
torch.manual_seed(0)
for n_tokens, cell, t, t_a, C in [(4096, 4, 1638, 3891, 640), (4096, 2, 1638, None, 640), (9216, 4, 3686, 8755, 320), (9216, 2, 3686, None, 320), (16384, 2, 6553, None, 320)]:
    side = int(n_tokens**0.5)
    x = (torch.randn(2, n_tokens, C, device="cuda") * 20).half()
    dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
    num_dst = dst.index.numel()
    score, best = kernels.best_destination(x, dst.index, side, cell, cell)
    crowded = kernels.best_destination(x + 60 * torch.randn(C, device="cuda").half(), dst.index, side, cell, cell)[0]
    kernels.ONE_PROGRAM_MAX_TOKENS = 0
    ref = kernels.assign_slots(score, best, dst.is_dst, dst.slot, num_dst, t, t_a)
    line = f"N={n_tokens} D={num_dst} agents={t_a is not None}: radix {graph_us(lambda: kernels.assign_slots(score, best, dst.is_dst, dst.slot, num_dst, t, t_a)):.1f} us"
    kernels.ONE_PROGRAM_MAX_TOKENS = 10**9
    for w in (4, 8, 16, 32):
        kernels.ONE_PROGRAM_WARPS = w
        out = kernels.assign_slots(score, best, dst.is_dst, dst.slot, num_dst, t, t_a)
        same = all(torch.equal(a, b) for a, b in zip(out, ref) if a is not None)
        us = graph_us(lambda: kernels.assign_slots(score, best, dst.is_dst, dst.slot, num_dst, t, t_a))
        usc = graph_us(lambda: kernels.assign_slots(crowded, best, dst.is_dst, dst.slot, num_dst, t, t_a))
        line += f" | w{w} {us:.1f} (crowded {usc:.1f}){'' if same else ' MISMATCH'}"
    kernels.ONE_PROGRAM_WARPS = 8
    print(line, flush=True)
