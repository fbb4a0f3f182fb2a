"""Peak memory of one compiled UNet call in each stage of the paper's schedule, three ways: the
schedule as one graph (a torch.cond per merged block, agentsd.schedule.ONE_GRAPH_FOR_STAGES), a graph
per stage (the default while inductor does not cache graphs with a torch.cond), and unpatched. SD 1.5
at 1024px with random weights, fp16, default compile mode; the peak is above what was allocated before
the call, of the second call in each stage.

    python scripts/compiled_stage_memory.py

Without CUDA it runs a tiny UNet on the CPU with the eager backend (the code path, no peaks).
"""

import copy
import time

import torch

import agentsd
from agentsd import schedule
from agentsd.models import random_pipeline, tiny_pipeline


def main():
    cuda = torch.cuda.is_available()
    if cuda:
        base = random_pipeline("sd15", device="cuda", dtype=torch.float16).unet.eval()
        sample = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
        context = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    else:
        base = tiny_pipeline("sd15").unet.eval()
        sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, base.config.cross_attention_dim)
    timesteps = torch.linspace(981, 1, 50, device=sample.device).round()  # a list: index 0 is stage 0, 30 stage 1
    default = schedule.ONE_GRAPH_FOR_STAGES
    for variant in ("one graph", "graph per stage", "unpatched"):
        torch._dynamo.reset()
        schedule.ONE_GRAPH_FOR_STAGES = variant == "one graph"
        unet = copy.deepcopy(base)
        if variant != "unpatched":
            agentsd.apply_patch(unet, seed=0, min_tokens=None if cuda else 0)
        compiled = torch.compile(unet, fullgraph=True, backend="inductor" if cuda else "eager")
        start, peaks = time.perf_counter(), {}
        with torch.no_grad():
            for stage, index in (("stage 0", 0), ("stage 1", 30)):
                for _ in range(2):
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated()
                    compiled(sample, timesteps[index], context)
                    if cuda:
                        torch.cuda.synchronize()
                        peaks[stage] = f"{(torch.cuda.max_memory_allocated() - before) / 2**30:.3f} GB"
        print(f"{variant}: {peaks or 'no CUDA, no peaks'} ({time.perf_counter() - start:.1f} s, compiling included)", flush=True)
    schedule.ONE_GRAPH_FOR_STAGES = default


if __name__ == "__main__":
    main()
