"""Host microseconds of each piece of a patched top-level block, in eager mode, against the
baseline's: where an eager call at 512px (bound by the host, not the GPU) spends its extra time.

    python scripts/host_overhead.py --config sd15-512 --ratio 0.4

Each piece is called --calls times in a row and timed on the host clock without waiting for the
GPU (scripts/timing.host_us). Where a piece's GPU time is the larger (a whole block, which runs
its feed-forward too), the queue fills and the figure is GPU time instead; the UNet calls are
host-bound at 512px.
"""

import argparse

import torch
from diffusers.models.attention import BasicTransformerBlock

import agentsd
from agentsd import kernels
from agentsd.merge import merge, merge_with_agents, unmerge
from agentsd.models import unet_from_config
from speed_benchmark import CONFIGS, STAGES, unet_inputs
from timing import host_us

if kernels.triton is not None:
    tl = kernels.triton.language

    @kernels.triton.jit
    def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + p, 0.0, mask=p < n)


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="sd15-512", choices=sorted(CONFIGS))
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    kind, size = CONFIGS[args.config]
    unet = unet_from_config(kind).to("cuda", torch.float16).eval()
    inputs = unet_inputs(unet, kind, size, torch.device("cuda"))
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen[name] = args[0] if args else kwargs["hidden_states"]

        return hook

    hooks = [block.register_forward_pre_hook(keep("x"), with_kwargs=True), block.attn1.register_forward_pre_hook(keep("h"), with_kwargs=True)]
    unet(*inputs)
    for h in hooks:
        h.remove()
    x, h = seen["x"], seen["h"]
    rows = []

    def row(name, fn, calls=args.calls):
        us = host_us(fn, calls)
        rows.append((name, us))
        print(f"{name:55s} {us:9.1f} us", flush=True)

    flat = torch.empty(4096, device="cuda")
    row("triton: empty kernel launch", lambda: _empty_kernel[(4,)](flat, 4096, BLOCK=1024))
    row("torch.empty (2, 4096, 320)", lambda: torch.empty_like(x))
    row("torch add", lambda: x + 1)
    row("F.linear 320 -> 320", lambda: block.attn1.to_q(h))
    row("unpatched attn1", lambda: block.attn1(h))
    row("unpatched block", lambda: block(x, encoder_hidden_states=inputs[2]))
    row("unpatched UNet call", lambda: unet(*inputs), 20)

    for stage_name, stage in STAGES.items():
        agentsd.apply_patch(unet, args.ratio, **stage, seed=0)
        patch = unet._agentsd
        unet(*inputs)  # sets the call's state (latent size, timestep) and compiles
        patch.before_unet(unet, inputs, {})
        block_merge = block.attn1.processor.block_merge
        plan = patch.plan_for(x)
        prefix = f"{stage_name}:"
        row(f"{prefix} plan_for (whole plan)", lambda: patch.plan_for(x))
        if plan.num_agent_merged is not None:
            row(f"{prefix} merge_with_agents", lambda: merge_with_agents(h, plan))
        row(f"{prefix} merge", lambda: merge(h, plan))
        merged = merge(h, plan)
        row(f"{prefix} unmerge", lambda: unmerge(merged, plan))

        def patched_attn1():
            block_merge.plan = plan
            return block.attn1(h)

        row(f"{prefix} patched attn1 (plan given)", patched_attn1)
        row(f"{prefix} patched block (plan built)", lambda: block(x, encoder_hidden_states=inputs[2]))
        row(f"{prefix} patched UNet call", lambda: unet(*inputs), 20)
        agentsd.remove_patch(unet)
    return rows


if __name__ == "__main__":
    main()
