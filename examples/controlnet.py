"""ControlNet with AgentSD: only the UNet is patched, the ControlNet runs as it is.

    python examples/controlnet.py --control-image edges.png
    python examples/controlnet.py --model tiny      # a ControlNet made from the tiny UNet
"""

import argparse

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

import agentsd
from agentsd.pipelines import DEFAULT_MODEL, load_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--controlnet", default="lllyasviel/sd-controlnet-canny")
parser.add_argument("--control-image", help="a control image (default: drawn circles)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--out", default="controlnet.png")
args = parser.parse_args()

pipe = load_pipeline(args.model)  # CUDA and float16 when there is a GPU
device, dtype = pipe.device, pipe.unet.dtype
if args.model.startswith("tiny"):
    controlnet = ControlNetModel.from_unet(pipe.unet)
else:
    controlnet = ControlNetModel.from_pretrained(args.controlnet, torch_dtype=dtype)
pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet).to(device)
size = pipe.unet.config.sample_size * pipe.vae_scale_factor
if args.control_image:
    control = Image.open(args.control_image).convert("RGB").resize((size, size))
else:
    control = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(control)
    for r in range(size // 8, size // 2, size // 8):
        draw.ellipse([size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r], outline="white")
agentsd.apply_patch(pipe)
image = pipe("a stained glass window", image=control, num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
image.save(args.out)
print(f"saved {args.out}")
