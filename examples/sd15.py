"""Stable Diffusion 1.5 with AgentSD: the paper's schedule, then the exact original model again.

    python examples/sd15.py                 # the SD 1.5 weights from the hub (or a local folder: --model DIR)
    python examples/sd15.py --model tiny    # random tiny weights, seconds on a CPU
"""

import argparse

import torch

import agentsd
from agentsd.pipelines import DEFAULT_MODEL, load_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--out", default="sd15.png")
args = parser.parse_args()

pipe = load_pipeline(args.model)  # CUDA and float16 when there is a GPU
agentsd.apply_patch(pipe)  # ratio 0.4: agent attention for the first 40% of the steps, ToMe after
image = pipe("a photo of an astronaut riding a horse on the moon", num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
image.save(args.out)
agentsd.remove_patch(pipe)
print(f"saved {args.out}")
