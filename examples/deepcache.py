"""agentsd composed with DeepCache's step caching: the two speed-ups multiply (2.58x at SD 1.5 1024px on
an H200, README "Where it helps"). Needs `pip install "agentsd[deepcache]"`.

    python examples/deepcache.py                 # the SD 1.5 weights from the hub (or --model DIR)
    python examples/deepcache.py --model tiny    # random tiny weights, seconds on a CPU
"""

import argparse

import torch
from DeepCache import DeepCacheSDHelper

import agentsd
from agentsd.pipelines import DEFAULT_MODEL, load_pipeline

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--interval", type=int, default=3, help="DeepCache's cache interval: the full UNet every N steps")
parser.add_argument("--out", default="deepcache.png")
args = parser.parse_args()

pipe = load_pipeline(args.model)
agentsd.apply_patch(pipe)  # either order works: agentsd, then DeepCache, or the other way round
helper = DeepCacheSDHelper(pipe=pipe)
helper.set_params(cache_interval=args.interval, cache_branch_id=0)
helper.enable()
image = pipe("a photo of an astronaut riding a horse on the moon", num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
image.save(args.out)
helper.disable()  # and in either order again: each takes back only what it did
agentsd.remove_patch(pipe)
print(f"saved {args.out}")
