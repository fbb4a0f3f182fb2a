"""Where a patched stage's time goes inside a CUDA-graph UNet call: pieces of the plan replaced by
stand-ins that launch nothing (results cached from a real call) or by the free plan's index_select.
PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/ablate.py sd15-2048 tome 0.4"""
import contextlib, statistics, sys
import torch
from agentsd import attention, kernels
from agentsd.models import unet_from_config
from speed_benchmark import CONFIGS, unet_inputs, variant
from timing import cuda_graph, times_ms

config, stage, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
kind, size = CONFIGS[config]
unet = unet_from_config(kind).to("cuda", torch.float16).eval()
inputs = unet_inputs(unet, kind, size, torch.device("cuda"))


def cached(fn):
    memo = {}
    def call(*args, **kwargs):
        key = tuple((a.shape, a.dtype) if torch.is_tensor(a) else a for a in args)
        if key not in memo:
            memo[key] = fn(*args, **kwargs)
        return memo[key]
    return call


def free_merge(x, slot, agent_slot, dst_index, is_dst, num_slots, num_agents):
    n = x.shape[1]
    keep = torch.arange(num_slots, device=x.device) * n // num_slots
    agents = None if num_agents is None else x.index_select(1, torch.arange(num_agents, device=x.device) * n // num_agents)
    return x.index_select(1, keep), agents


def free_unmerge(x, plan):
    n = plan.slot.shape[1]
    return x.index_select(1, torch.arange(n, device=x.device) * x.shape[1] // n)


PIECES = {
    "destinations": ("destinations", cached),
    "match": ("best_destination", cached),
    "select": ("assign_slots", cached),
    "merge": ("merge_mean", lambda fn: free_merge),
}


@contextlib.contextmanager
def without(*pieces):
    saved = {}
    for p in pieces:
        if p == "unmerge":
            saved[(attention, "unmerge")] = attention.unmerge
            attention.unmerge = free_unmerge
            continue
        name, stand_in = PIECES[p]
        saved[(kernels, name)] = getattr(kernels, name)
        setattr(kernels, name, stand_in(getattr(kernels, name)))
    try:
        yield
    finally:
        for (module, name), fn in saved.items():
            setattr(module, name, fn)


cases = {
    "sdpa": ("sdpa", ()),
    f"free-{stage}": (f"free-{stage}", ()),
    stage: (stage, ()),
    "-match": (stage, ("destinations", "match")),
    "-match-select": (stage, ("destinations", "match", "select")),
    "-match-select-merge": (stage, ("destinations", "match", "select", "merge")),
    "-all (unmerge as index_select)": (stage, ("destinations", "match", "select", "merge", "unmerge")),
    "-merge": (stage, ("merge",)),
    "-unmerge": (stage, ("unmerge",)),
}
times = {label: [] for label in cases}
with torch.no_grad():
    for _ in range(3):  # interleaved turns; one graph alive at a time (each holds a 2048px call's memory)
        for label, (name, pieces) in cases.items():
            with variant(unet, kind, name, ratio, inputs[0].shape[-2:]), without(*pieces):
                graph = cuda_graph(lambda: unet(*inputs))
            times[label] += times_ms(graph.replay, 5, warmup=1)
            del graph
print(f"{torch.cuda.get_device_name()}, {config} {stage} ratio {ratio}, CUDA graph, median of 15 (3 interleaved turns)")
base = statistics.median(times["sdpa"])
for label, t in times.items():
    m = statistics.median(t)
    print(f"  {label:34s} {m:8.2f} ms  ({base / m:.3f}x)")
