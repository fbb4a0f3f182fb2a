"""Which allocations are live at the peak of one compiled ToMe-stage call: one graph vs a graph per stage."""
import copy, linecache, sys, time
import torch
import agentsd
from agentsd import patch
from agentsd.models import random_pipeline

def live_at_peak(trace):
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e; total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
    return peak, at_peak

def where(e):
    out = []
    for f in e.get("frames", []):
        fn = f["filename"]
        if "torchinductor" in fn or "agentsd" in fn or "/tmp/" in fn and "site" not in fn:
            out.append(f"{fn.split('/')[-1]}:{f['line']} {f['name']}: {linecache.getline(fn, f['line']).strip()[:150]}")
        if len(out) >= 3:
            break
    return out or [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames", [])[:3]]

base = random_pipeline("sd15", device="cuda", dtype=torch.float16).unet.eval()
sample = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
context = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
timesteps = torch.linspace(981, 1, 50, device="cuda").round()
one_graph = patch.UNetPatch.plan_for
for variant in sys.argv[1:] or ("one graph", "graph per stage"):
    torch._dynamo.reset()
    allowed = variant == "one graph"
    patch.UNetPatch.plan_for = lambda self, x, staged=False, allowed=allowed: one_graph(self, x, allowed and staged)
    unet = copy.deepcopy(base)
    agentsd.apply_patch(unet, seed=0)
    compiled = torch.compile(unet, fullgraph=True)
    t = time.perf_counter()
    with torch.no_grad():
        compiled(sample, timesteps[30], context)  # ToMe stage
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
        compiled(sample, timesteps[30], context)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    peak_above = (torch.cuda.max_memory_allocated() - before) / 2**30
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, live = live_at_peak(trace)
    print(f"== {variant}: peak above before {peak_above:.3f} GiB, traced peak of new allocations {peak/2**30:.3f} GiB, "
          f"{len(live)} live, compile+2 calls {time.perf_counter()-t:.0f} s", flush=True)
    for e in sorted(live.values(), key=lambda e: -e["size"])[:12]:
        print(f"  {e['size']/2**20:8.1f} MiB", *where(e), sep="\n      ")
patch.UNetPatch.plan_for = one_graph
