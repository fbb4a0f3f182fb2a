"""Host against GPU time of compiled UNet calls, variants in the order given (default: SDXL 1024, the
ToMe stage then SDPA, as run at 1254ef7), with torch.profiler tables. Run from the repo root:
PYTHONPATH=.:scripts TORCH_LOGS=recompiles python scripts/results/2026-11-24-h100/compile_diag.py [KIND SIZE VARIANT...]
(The SD 1.5 1024 run of ded7c34, `compile_diag.py sd15 1024 sdpa agent tome`, ran with dynamo's default
cache size limit, not 64; it logged no recompilation, so the limit did not come into play.)"""
import sys, time, torch, torch._dynamo
from torch.profiler import ProfilerActivity, profile

from agentsd.models import unet_from_config
from speed_benchmark import unet_inputs, variant

kind, size, names = (sys.argv[1], int(sys.argv[2]), sys.argv[3:]) if len(sys.argv) > 1 else ("sdxl", 1024, ["tome", "sdpa"])
torch._dynamo.config.cache_size_limit = 64
unet = unet_from_config(kind).to("cuda", torch.float16).eval()
inputs = unet_inputs(unet, kind, size, torch.device("cuda"))
for name in names:
    with torch.no_grad(), variant(unet, kind, name, 0.4, inputs[0].shape[-2:]):
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
