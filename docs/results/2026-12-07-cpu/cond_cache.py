"""Does marking torch.cond cacheable let inductor's caches keep the one-graph schedule, and key both branches?
TORCHINDUCTOR_CACHE_DIR=DIR python cond_cache.py MARK(0/1) K_SCALE2 [SECOND_STAGE_RATIO]  (the runs share DIR)"""
import sys, time, torch, agentsd
from torch._dynamo.utils import counters
from agentsd import schedule
from agentsd.models import unet_from_config
mark, k2 = int(sys.argv[1]), float(sys.argv[2])
if mark:
    c = torch.ops.higher_order.cond
    torch._inductor.config.unsafe_marked_cacheable_functions = {f"{c.__module__}.{c.__name__}": torch.__version__}
schedule.ONE_GRAPH_FOR_STAGES = True
torch.manual_seed(0)
unet = unet_from_config("sd15", tiny=True).eval()
r2 = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
agentsd.apply_patch(unet, 0.5, seed=0, min_tokens=0, k_scale2=k2, schedule=[agentsd.Stage(0.4, 4, 4, 0.95), agentsd.Stage(1.0, 2, 2, 0.5, ratio=r2)])
g = torch.Generator().manual_seed(1)
x = torch.randn(2, 4, 16, 16, generator=g); c_ = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
ts = torch.linspace(999, 0, 10)
with torch.no_grad():
    eager = [unet(x, ts[i], c_).sample for i in (0, 7)]
    f = torch.compile(unet, fullgraph=True)
    t0 = time.perf_counter()
    out = [f(x, ts[i], c_).sample for i in (0, 7)]
    dt = time.perf_counter() - t0
err = [float((a - b).abs().max()) for a, b in zip(eager, out)]
print(f"mark={mark} k2={k2} r2={r2} {dt:.1f} s err={err}", {k: v for k, v in counters["inductor"].items() if "cache" in k},
      {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}, flush=True)
