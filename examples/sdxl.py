"""SDXL with AgentSD. SDXL's top level has no transformer blocks, so agentsd patches level 2 by default.

    python examples/sdxl.py
    python examples/sdxl.py --model tiny-sdxl
"""

import argparse

import torch

import agentsd
from agentsd.pipelines import load_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--out", default="sdxl.png")
args = parser.parse_args()

pipe = load_pipeline(args.model)  # CUDA and float16 when there is a GPU
agentsd.apply_patch(pipe, ratio=0.5)
image = pipe("a watercolor of a lighthouse at dawn", num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
image.save(args.out)
print(f"saved {args.out}")
