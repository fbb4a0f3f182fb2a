"""img2img with AgentSD. The schedule knows where `strength` starts the run: at 0.5 it begins halfway
down the trajectory, past the agent stage, so every step is plain ToMe.

    python examples/img2img.py --image photo.png
    python examples/img2img.py --model tiny
"""

import argparse

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

import agentsd
from agentsd.pipelines import DEFAULT_MODEL, load_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--image", help="input image (default: a gradient)")
parser.add_argument("--strength", type=float, default=0.75)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--out", default="img2img.png")
args = parser.parse_args()

pipe = load_pipeline(args.model)  # CUDA and float16 when there is a GPU
pipe = StableDiffusionImg2ImgPipeline(**pipe.components)  # same weights, the img2img pipeline
size = pipe.unet.config.sample_size * pipe.vae_scale_factor
init = Image.open(args.image).convert("RGB").resize((size, size)) if args.image else Image.linear_gradient("L").convert("RGB").resize((size, size))
agentsd.apply_patch(pipe)
image = pipe("a fantasy landscape, trending on artstation", image=init, strength=args.strength,
             num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
image.save(args.out)
print(f"saved {args.out}")
