"""Host against GPU time of compiled UNet calls, variants in the order given, with torch.profiler tables.
Run from the repo root: PYTHONPATH=.:scripts TORCH_LOGS=recompiles,graph_breaks python scripts/results/2026-11-24-h100/compile_diag_sd15.py sd15 1024 sdpa agent tome"""
import time, torch, torch._dynamo
from torch.profiler import ProfilerActivity, profile

from agentsd.models import unet_from_config
from speed_benchmark import unet_inputs, variant

import sys
KIND, SIZE, NAMES = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

unet = unet_from_config(KIND).to("cuda", torch.float16).eval()
inputs = unet_inputs(unet, KIND, SIZE, torch.device("cuda"))
for name in NAMES:
    with torch.no_grad(), variant(unet, KIND, name, 0.4, inputs[0].shape[-2:]):
        torch._dynamo.reset()
        compiled = torch.compile(unet, fullgraph=True)
        for _ in range(5):
            compiled(*inputs)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            compiled(*inputs)
        host = (time.perf_counter() - t) / 10 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 10 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                compiled(*inputs)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) / 3e3
        print(f"== {name}: host {host:.1f} ms/call to launch, wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms/call", flush=True)
        print(ev.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
        print(ev.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)
