"""Where merge_mean's time goes at SD 1.5 level-1 shapes (profiler, per kernel), against the free
plan's index_select. PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/merge_parts.py"""
import torch
from torch.profiler import ProfilerActivity, profile
from agentsd import kernels, merge

torch.manual_seed(0)
for n, cell, t, t_a in ((65536, 2, 26214, None), (65536, 4, 26214, 61440), (4096, 2, 1638, None), (4096, 4, 1638, 3840)):
    side = int(n ** 0.5)
    xt = (torch.randn(2, 320, n, device="cuda") * 20).half().transpose(1, 2)
    xt = xt + 10 * torch.randn(320, device="cuda").half()
    x = xt.contiguous()
    dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
    D = dst.index.numel()
    score, best = kernels.best_destination(xt, dst.index, side, cell, cell)
    slot, agent_slot = kernels.assign_slots(score, best, dst.is_dst, dst.slot, D, t, t_a)
    counts = torch.bincount(best[0][slot[0] < D], minlength=D)
    keep = torch.arange(n - t, device="cuda") * n // (n - t)
    agents = None if t_a is None else torch.arange(n - t_a, device="cuda") * n // (n - t_a)
    fns = {
        "merge_mean": lambda: kernels.merge_mean(x, slot, agent_slot, dst.index, dst.is_dst, n - t, None if t_a is None else n - t_a),
        "free": lambda: (x.index_select(1, keep), None if agents is None else x.index_select(1, agents)),
        "plan": lambda: kernels.assign_slots(score, best, dst.is_dst, dst.slot, D, t, t_a),
        "match": lambda: kernels.best_destination(xt, dst.index, side, cell, cell),
    }
    print(f"N={n} cell={cell} D={D}: sources per destination max {counts.max().item()}, mean {counts.float().mean().item():.2f}", flush=True)
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        total = 0
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                total += e.self_device_time_total / 10
                print(f"    {name} {e.key[:70]}: {e.self_device_time_total / e.count:.1f} us x{e.count / 10:.0f}")
        print(f"  {name}: {total:.1f} us per call", flush=True)
