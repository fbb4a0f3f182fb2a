"""Host microseconds of each piece of a merge plan and merge on CUDA (SD 1.5 512px, level 1: 4096 tokens,
320 channels, batch 2), in warm loops, with each piece's GPU time beside it (CUDA events over the
loop): where a piece's host time is not launches, what it is.

    PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/plan_pieces.py
"""
import time

import torch

from agentsd import kernels, merge
from agentsd.merge import Grid


def host_and_gpu_us(fn, calls=500, rounds=5):
    best = None
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls * 1e6
        end.record()
        end.synchronize()
        gpu = start.elapsed_time(end) * 1e3 / calls
        best = (host, gpu) if best is None or host < best[0] else best
    return best


@torch.no_grad()
def main():
    x = torch.randn(2, 320, 4096, device="cuda", dtype=torch.float16).transpose(1, 2)  # channels-last, as SD 1.5 blocks get it
    h = torch.randn(2, 4096, 320, device="cuda", dtype=torch.float16)
    timestep = torch.tensor(999.0, device="cuda")
    grid = Grid(1, 64, 64)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; host us / GPU us per call (loop of 500)")
    for name, (sy, sx, agent_ratio) in {"agent": (4, 4, 0.95), "tome": (2, 2, 0.5)}.items():
        num_dst = (64 // sy) * (64 // sx)
        t, t_a = merge.merge_counts(4096, num_dst, 0.4, agent_ratio)
        dst = merge.choose_destinations(grid, sy, sx, 0, timestep, x.device)
        score, best = kernels.best_destination(x, dst.index, dst.width, sy, sx)
        plan = merge.plan_merge(x, dst, t, t_a)
        n_agents = None if t_a is None else 4096 - t_a
        pieces = {
            "choose_destinations": lambda: merge.choose_destinations(grid, sy, sx, 0, timestep, x.device),
            "  kernels.destinations": lambda: kernels.destinations(64, 64, sy, sx, 1, x.device, seed=0, timestep=timestep),
            "  its 3 torch.empty": lambda: (torch.empty(num_dst, dtype=torch.int64, device=x.device),
                                            torch.empty(4096, dtype=torch.int64, device=x.device),
                                            torch.empty(4096, dtype=torch.bool, device=x.device)),
            "  its _launch": lambda: kernels._launch(
                kernels._destinations_kernel, (4,), timestep, 0, 0, dst.index, dst.slot, dst.is_dst, 64, 64, 64 // sx,
                num_dst, 1, SY=sy, SX=sx, KEY=1, BLOCK=1024),
            "best_destination": lambda: kernels.best_destination(x, dst.index, dst.width, sy, sx),
            "assign_slots": lambda: kernels.assign_slots(score, best, dst.is_dst, dst.slot, num_dst, t, t_a),
            "plan_merge": lambda: merge.plan_merge(x, dst, t, t_a),
            "merge_mean": lambda: kernels.merge_mean(h, plan.slot, plan.agent_slot, dst.index, dst.is_dst, plan.num_slots, n_agents),
            "  its torch.zeros (sums)": lambda: torch.zeros(2, num_dst, 321 * (1 + (t_a is not None)), device=x.device, dtype=torch.int64),
            "unmerge": lambda: merge.unmerge(h[:, : plan.num_slots], plan),
            "x.index_select(1, idx) (free plan)": lambda: h.index_select(1, plan.destinations.index),
            "kernels.available(x)": lambda: kernels.available(x),
        }
        for label, fn in pieces.items():
            fn()
            host, gpu = host_and_gpu_us(fn)
            print(f"{name:6s} {label:38s} {host:7.1f} / {gpu:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
