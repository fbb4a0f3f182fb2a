"""Host time of eager SD 1.5 512 UNet calls with agentsd's kernels launched the old way (commit 7262424:
`compiled[grid](*tensors)`, Triton's runner) and the new way (4aed437: the launcher itself, tensors as
addresses), in one process, rounds alternating, against SDPA and the free plans. Per call: the host's
time to enqueue it (perf_counter, the GPU drained outside the timing) and its wall time (CUDA events).

    PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/launch_ab.py
"""
import statistics
import time

import torch

from agentsd import kernels
from agentsd.models import unet_from_config
from speed_benchmark import unet_inputs, variant

_old_compiled = {}


def old_launch(fn, grid, *args, **kwargs):  # kernels._launch as at 7262424
    key = (fn, torch.cuda.current_device(), *kwargs.items(), *map(old_specialization, args))
    compiled = _old_compiled.get(key)
    if compiled is None:
        _old_compiled[key] = fn[grid](*args, **kwargs)
    else:
        compiled[(*grid, 1, 1)[:3]](*args, *[kwargs[name] for name in fn.arg_names[len(args):]])


def old_specialization(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    return type(arg)


NEW_LAUNCH = kernels._launch


@torch.no_grad()
def main(rounds=15, calls=8):
    unet = unet_from_config("sd15").to("cuda", torch.float16).eval()
    inputs = unet_inputs(unet, "sd15", 512, torch.device("cuda"))
    names = ["sdpa", "agent old", "agent new", "free-agent", "tome old", "tome new", "free-tome"]
    host, wall = {n: [] for n in names}, {n: [] for n in names}
    ratios_host, ratios_wall = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds + 1):
        turn_host, turn_wall = {}, {}
        for name in names:
            kernels._launch = old_launch if name.endswith("old") else NEW_LAUNCH
            with variant(unet, "sd15", name.split()[0], 0.4, inputs[0].shape[-2:]):
                for _ in range(2):
                    unet(*inputs)
                torch.cuda.synchronize()
                h, w = [], []
                for _ in range(calls):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0 = time.perf_counter()
                    start.record()
                    unet(*inputs)
                    end.record()
                    h.append((time.perf_counter() - t0) * 1e3)
                    end.synchronize()
                    w.append(start.elapsed_time(end))
            if r == 0:
                continue  # warm-up round (compiles, autotunes)
            turn_host[name], turn_wall[name] = statistics.median(h), statistics.median(w)
            host[name] += h
            wall[name] += w
        for name in turn_host:
            ratios_host[name].append(turn_host["sdpa"] / turn_host[name])
            ratios_wall[name].append(turn_wall["sdpa"] / turn_wall[name])
    kernels._launch = NEW_LAUNCH
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {rounds} rounds x {calls} calls per variant")
    print(f"{'variant':12s} {'host ms':>8s} {'wall ms':>8s} {'paired speed-up (host)':>24s} {'(wall)':>8s}")
    for name in names:
        print(f"{name:12s} {statistics.median(host[name]):8.2f} {statistics.median(wall[name]):8.2f} "
              f"{statistics.median(ratios_host[name]):24.3f} {statistics.median(ratios_wall[name]):8.3f}")


if __name__ == "__main__":
    main()
