"""Eager SD 1.5 512: host CPU time (thread_time, excludes preemption) to launch one UNet call, per variant, in turns."""
import statistics, time
import torch
from speed_benchmark import unet_inputs, variant
from agentsd.models import unet_from_config

@torch.no_grad()
def main():
    unet = unet_from_config("sd15").to("cuda", torch.float16).eval()
    inputs = unet_inputs(unet, "sd15", 512, torch.device("cuda"))
    names = ["sdpa", "no-merge", "agent", "free-agent", "tome", "free-tome"]
    for name in names:
        with variant(unet, "sd15", name, 0.4, inputs[0].shape[-2:]):
            for _ in range(5): unet(*inputs)
    torch.cuda.synchronize()
    cpu = {n: [] for n in names}; wall = {n: [] for n in names}
    for turn in range(20):
        for name in names:
            with variant(unet, "sd15", name, 0.4, inputs[0].shape[-2:]):
                for i in range(8):
                    torch.cuda.synchronize()
                    t0, w0 = time.thread_time(), time.perf_counter()
                    unet(*inputs)
                    t1 = time.thread_time()
                    torch.cuda.synchronize()
                    w1 = time.perf_counter()
                    if i >= 3:
                        cpu[name].append((t1 - t0) * 1e3); wall[name].append((w1 - w0) * 1e3)
    base_c, base_w = statistics.median(cpu["sdpa"]), statistics.median(wall["sdpa"])
    print("| variant | host CPU ms to launch a call | vs sdpa | wall ms (synced) | vs sdpa |")
    print("|---|---|---|---|---|")
    for n in names:
        c, w = statistics.median(cpu[n]), statistics.median(wall[n])
        print(f"| {n} | {c:.2f} | {base_c / c:.3f}x | {w:.2f} | {base_w / w:.3f}x |")

main()
main()
