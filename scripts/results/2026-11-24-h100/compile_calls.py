"""Per-call times of compiled UNet calls right after compiling, as speed_benchmark.measure times them
(CUDA events, a sync per call), on a fresh machine: is a slow start a prefix that warm-up should cover?
PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/compile_calls.py sd15 1024 sdpa agent tome"""
import sys, time, torch, torch._dynamo
from agentsd.models import unet_from_config
from speed_benchmark import unet_inputs, variant, measure
from timing import times_ms

kind, size, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
unet = unet_from_config(kind).to("cuda", torch.float16).eval()
inputs = unet_inputs(unet, kind, size, torch.device("cuda"))
with torch.no_grad():
    measure(unet, inputs, "eager", 5, torch.device("cuda"))
    for name in names:
        with variant(unet, kind, name, 0.4, inputs[0].shape[-2:]):
            torch._dynamo.reset()
            compiled = torch.compile(unet, fullgraph=True)
            start = time.perf_counter()
            compiled(*inputs)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            calls = times_ms(lambda: compiled(*inputs), 60, warmup=0)
            print(f"{name}: first call {first:.1f} s; then ms per call in order:", flush=True)
            for i in range(0, 60, 10):
                print("   ", " ".join(f"{t:6.1f}" for t in calls[i:i + 10]), flush=True)
