"""Prototype: eager SD 1.5 512, a lean forward for the top-level blocks, against diffusers' own."""
import statistics, sys, types, contextlib
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from speed_benchmark import unet_inputs, variant, measure
from bench_processors import blocks_up_to
from agentsd.models import unet_from_config

def attention(attn, h, context):
    q = attn.to_q(h); k = attn.to_k(context); v = attn.to_v(context)
    q, k, v = (z.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for z in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    return attn.to_out[0](o.transpose(1, 2).flatten(2))

def lean(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
         timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
    x = hidden_states
    h = self.norm1(x)
    a1 = self.attn1
    if type(a1.processor) is AttnProcessor2_0:
        x = attention(a1, h, h) + x
    else:
        x = a1.processor(a1, h) + x
    h = self.norm2(x)
    x = attention(self.attn2, h, encoder_hidden_states) + x
    h = self.norm3(x)
    geglu = self.ff.net[0]
    h, gate = geglu.proj(h).chunk(2, dim=-1)
    return self.ff.net[2](h * F.gelu(gate)) + x

@contextlib.contextmanager
def leaned(unet, on):
    blocks = [b for _, b in blocks_up_to(unet, 1)] if on else []
    for b in blocks:
        b.forward = types.MethodType(lean, b)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward

@torch.no_grad()
def main():
    unet = unet_from_config("sd15").to("cuda", torch.float16).eval()
    inputs = unet_inputs(unet, "sd15", 512, torch.device("cuda"))
    # exactness of the lean forward
    ref = unet(*inputs).sample
    with leaned(unet, True):
        out = unet(*inputs).sample
    print("lean == diffusers:", torch.equal(ref, out), (ref - out).abs().max().item(), flush=True)
    names = ["sdpa", "agent", "tome", "free-agent", "free-tome"]
    variants = [(n, l) for n in names for l in (False, True)]
    for rep in range(3):
        times = {v: [] for v in variants}
        for _ in range(12):
            for name, on in variants:
                with variant(unet, "sd15", name, 0.4, inputs[0].shape[-2:]), leaned(unet, on):
                    times[(name, on)] += measure(unet, inputs, "eager", 5, torch.device("cuda"))
        base = statistics.median(times[("sdpa", False)])
        print(f"--- run {rep}")
        for (name, on), t in times.items():
            m = statistics.median(t)
            print(f"{name + (' lean' if on else ''):18s} {m:7.2f} ms  {base / m:.3f}x", flush=True)

main()
