"""Looped matching: 9cd4377 (kernels_head) against the split over destinations, SDXL level-2 shapes.
    git show 9cd4377:agentsd/kernels.py | sed 's/"agentsd::{name}"/"agentsd_head::{name}"/' > scratch/kernels_head.py
    PYTHONPATH=.:scripts:scratch python scripts/results/2026-11-24-h100/split_destinations.py"""
import torch, triton
import kernels_head
from agentsd import kernels, merge
from timing import cuda_graph, median_ms
torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
for n, cell, c in ((4096, 2, 640), (4096, 4, 640), (16384, 2, 640), (1024, 2, 1280)):
    side = int(n ** 0.5)
    x = (torch.randn(2, n, c, device="cuda") * 20).half() + 10 * torch.randn(c, device="cuda").half()
    dst = merge.choose_destinations(merge.Grid(2, side, side), cell, cell, seed=0, timestep=981, device="cuda")
    head = lambda: kernels_head.best_destination(x, dst.index, side, cell, cell)
    new = lambda: kernels.best_destination(x, dst.index, side, cell, cell)
    (s0, b0), (s1, b1) = head(), new()
    splits = kernels._destination_splits(2, n, dst.index.numel(), x.device)
    gs = {"head": cuda_graph(head, 5), "new": cuda_graph(new, 5)}
    t = {k: min(median_ms(g.replay, 10) for _ in range(3)) / 5 * 1e3 for k, g in gs.items()}
    print(f"N={n} cell={cell} C={c} splits={splits}: head {t['head']:.1f} us, new {t['new']:.1f} us ({t['head'] / t['new']:.2f}x); "
          f"score equal {torch.equal(s0, s1)}, best equal {torch.equal(b0, b1)}", flush=True)
