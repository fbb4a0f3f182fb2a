"""Does a second fresh process hit inductor's caches for the patched UNet? Prints counters and bypass reasons."""
import logging, sys, time, torch, agentsd
from torch._dynamo.utils import counters
from agentsd import patch
from agentsd.models import unet_from_config
reasons = []
class Catch(logging.Handler):
    def emit(self, record):
        msg = record.getMessage()
        if "ypass" in msg: reasons.append(msg[:300])
for name in ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache", "torch._inductor"):
    lg = logging.getLogger(name); lg.setLevel(logging.INFO); lg.addHandler(Catch())
variant = sys.argv[1]
if variant == "graph-per-stage":
    one = patch.UNetPatch.plan_for
    patch.UNetPatch.plan_for = lambda self, x, staged=False: one(self, x, False)
unet = unet_from_config("sd15", tiny=True).eval().cuda().half()
if variant != "plain":
    agentsd.apply_patch(unet, 0.5, seed=0, min_tokens=0)
sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.half)
context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.half)
t0 = time.perf_counter()
with torch.no_grad():
    torch.compile(unet, fullgraph=True)(sample, torch.tensor(981., device="cuda"), context)
torch.cuda.synchronize()
print(variant, f"{time.perf_counter()-t0:.1f} s", {k: v for k, v in counters["inductor"].items() if "cache" in k},
      {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}, sorted(set(reasons))[:4], flush=True)
