"""Dynamo and AOT tracing per stage (CPU, backend aot_eager): full SD 1.5 UNet config, 1024 px latents.

    python docs/results/2026-12-07-h100-c/trace_cost_cpu.py {baseline,agentsd}
"""
import sys, time, torch, agentsd
from torch._dynamo.utils import compile_times, compilation_time_metrics
from agentsd.models import unet_from_config
variant = sys.argv[1]
backend = sys.argv[2] if len(sys.argv) > 2 else "aot_eager"
unet = unet_from_config("sd15").eval()
if variant != "baseline":
    agentsd.apply_patch(unet, seed=0)
ts = torch.linspace(999, 0, 50)
x = torch.randn(2, 4, 128, 128); c = torch.randn(2, 77, 768)
f = torch.compile(unet, backend=backend, fullgraph=True)
with torch.no_grad():
    for i in (0, 30):  # agent stage, then ToMe stage
        compilation_time_metrics.clear()
        t0 = time.perf_counter(); f(x, ts[i], c); dt = time.perf_counter() - t0
        names, vals = compile_times(repr="csv", aggregate=True)
        d = dict(zip(names, map(float, vals)))
        print(variant, "step", i, f"call {dt:.1f} s", {k: round(d[k], 2) for k in ("bytecode_tracing", "OutputGraph.call_user_compiler", "build_guards", "_compile.compile_inner") if k in d}, flush=True)
