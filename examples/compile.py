"""AgentSD under torch.compile: patch first, then compile the UNet (fullgraph works: no graph break
in agentsd). The schedule's two stages compile once each; later runs switch between them freely.

    python examples/compile.py
    python examples/compile.py --model tiny --backend eager
"""

import argparse
import time

import torch

import agentsd
from agentsd.pipelines import DEFAULT_MODEL, load_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--backend", default="inductor")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--out", default="compiled.png")
args = parser.parse_args()

pipe = load_pipeline(args.model)  # CUDA and float16 when there is a GPU
agentsd.apply_patch(pipe)
pipe.unet = torch.compile(pipe.unet, backend=args.backend, fullgraph=True)
for run in ("compiling", "compiled"):
    start = time.perf_counter()
    image = pipe("a cozy cabin in the snow", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]
    print(f"{run}: {time.perf_counter() - start:.2f} s")
image.save(args.out)
print(f"saved {args.out}")
