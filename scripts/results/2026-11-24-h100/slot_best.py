"""kernels.best_destination with the per-slot running best against the same at commit 788651c (a
reduction across threads per destination tile), SD 1.5 level-1 shapes, channels-last fp16 input,
batch 2; CUDA graph of 5, three interleaved turns, the best of each; then each kernel's own time
under the profiler. The old module is kernels.py of 788651c with its custom ops renamed:
    git show 788651c:agentsd/kernels.py | sed 's/"agentsd::{name}"/"agentsd_head::{name}"/' > scratch/kernels_head.py
    PYTHONPATH=.:scripts:scratch python scripts/results/2026-11-24-h100/slot_best.py"""
import torch
import kernels_head
from agentsd import kernels, merge
from timing import cuda_graph, median_ms

torch.manual_seed(0)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for n, cell in ((65536, 2), (65536, 4), (16384, 2), (16384, 4), (4096, 2), (4096, 4)):
    side = int(n ** 0.5)
    x = (torch.randn(2, 320, n, device="cuda") * 20).half().transpose(1, 2)
    x = x + 10 * torch.randn(320, device="cuda").half()
    dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
    head = lambda: kernels_head.best_destination(x, dst.index, side, cell, cell)
    new = lambda: kernels.best_destination(x, dst.index, side, cell, cell)
    (s0, b0), (s1, b1) = head(), new()
    src = ~torch.isinf(s0)
    same = (b0 == b1).float().mean().item()
    err = (s0[src] - s1[src]).abs().max().item()
    gathers = {}
    for name, fn in (("head", head), ("new", new)):
        gathers[name] = cuda_graph(fn, 5)
    times = {k: [] for k in gathers}
    for _ in range(3):  # interleaved
        for name, g in gathers.items():
            times[name].append(median_ms(g.replay, 10) / 5 * 1e3)
    t0, t1 = min(times["head"]), min(times["new"])
    print(f"N={n} cell={cell}: head {t0:.1f} us, new {t1:.1f} us ({t0 / t1:.3f}x); best equal {same:.5f}, "
          f"score diff {err:.2e}, -inf equal {bool((torch.isinf(s0) == torch.isinf(s1)).all())}", flush=True)
    from torch.profiler import ProfilerActivity, profile
    for name, fn in (("head", head), ("new", new)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                print(f"    {name} {e.key[:60]}: {e.self_device_time_total / e.count:.1f} us x{e.count}")
