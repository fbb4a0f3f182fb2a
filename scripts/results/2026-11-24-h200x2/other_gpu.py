"""A patched UNet on cuda:1 while cuda:0 is the current device (a pipeline moved with .to("cuda:1")):
its output must equal the same UNet's on cuda:0, bit for bit (the kernels are deterministic).

    PYTHONPATH=.:scripts:tests python scripts/results/2026-11-24-h200x2/other_gpu.py
"""
import copy

import torch

import agentsd
from agentsd.models import unet_from_config
from conftest import unet_inputs


@torch.no_grad()
def main():
    assert torch.cuda.device_count() >= 2 and torch.cuda.current_device() == 0
    for kind in ("sd15", "sdxl"):
        base = unet_from_config(kind, tiny=True).eval().half()
        sample, timestep, context, kwargs = unet_inputs(kind, latent=(32, 32))
        outputs = []
        for device in ("cuda:0", "cuda:1"):
            unet = copy.deepcopy(base).to(device)
            move = lambda t: t.to(device, torch.float16 if t.is_floating_point() else t.dtype)  # noqa: E731
            extra = {k: {n: move(t) for n, t in v.items()} for k, v in kwargs.items()}
            for stage in (dict(sx=2, sy=2, agent_ratio=0.5), dict(sx=4, sy=4, agent_ratio=0.95)):
                agentsd.apply_patch(unet, 0.5, **stage, seed=0, max_downsample=2)
                out = unet(move(sample), move(timestep), move(context), **extra).sample
                torch.cuda.synchronize(device)
                outputs.append(out.cpu())
        half = len(outputs) // 2
        same = all(torch.equal(a, b) for a, b in zip(outputs[:half], outputs[half:]))
        print(f"{kind}: cuda:1 output equals cuda:0 output (both stages): {same}; "
              f"max |diff| {max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs[:half], outputs[half:])):.3g}")


if __name__ == "__main__":
    main()
