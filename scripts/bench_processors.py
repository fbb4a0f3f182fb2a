"""Attention processors that the speed benchmark compares agentsd with (benchmark use only).

- NoCoreProcessor: every projection, no attention core: no method that only speeds up the core can
  beat it (the "nocore" ceiling of shared/PERFORMANCE.md).
- ToDoProcessor: ToDo (Smith et al. 2024, "ToDo: Token Downsampling for Efficient Generation of
  High-Resolution Images", arXiv 2402.13573): keys and values from the level's tokens downsampled
  2x2 by nearest neighbour, queries kept.
- FreePlanProcessor: an agentsd stage whose merge plan costs nothing (fixed indices, gathers only):
  the best any implementation of that stage can do.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from agentsd.attention import agent_attention_of, output_projection, split_heads
from agentsd.config import build_config
from agentsd.block import lean_forward, runs_lean
from agentsd.merge import merge_counts
from agentsd.patch import transformer_blocks


def blocks_up_to(unet, max_downsample: int):
    """(downsample, block) of the BasicTransformerBlocks at levels downsampled at most `max_downsample`."""
    return [(level, block) for level, block in transformer_blocks(unet) if level <= max_downsample]


class NoCoreProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        return attn.to_out[1](attn.to_out[0](v + 0 * (q + k)))  # 0 * (q + k) keeps q and k alive under compile


class ToDoProcessor:
    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        grid = rearrange(hidden_states, "b (h w) c -> b h w c", h=self.height, w=self.width)
        context = rearrange(grid[:, ::2, ::2], "b h w c -> b (h w) c")  # nearest-neighbour 2x2 downsampling
        q = split_heads(attn, attn.to_q(hidden_states))
        k, v = (split_heads(attn, proj(context)) for proj in (attn.to_k, attn.to_v))
        return output_projection(attn, F.scaled_dot_product_attention(q, k, v, scale=attn.scale))


class FreePlanProcessor:
    """A stage with fixed gather indices in place of the merge plan and the merge."""

    config = build_config(seed=0)  # apply_patch's k_scale2, k_shortcut and attention precision

    def __init__(self, num_tokens: int, num_dst: int, ratio: float, agent_ratio: float, device):
        num_merged, num_agent_merged = merge_counts(num_tokens, num_dst, ratio, agent_ratio)
        kept = num_tokens - num_merged
        spread = lambda count: torch.arange(count, device=device) * num_tokens // count  # noqa: E731
        self.keep = spread(kept)
        self.back = torch.arange(num_tokens, device=device) * kept // num_tokens
        self.agents = None if num_agent_merged is None else spread(num_tokens - num_agent_merged)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        merged = hidden_states.index_select(1, self.keep)
        if self.agents is not None:
            out = agent_attention_of(attn, merged, hidden_states.index_select(1, self.agents), self.config)
        else:
            q, k, v = (split_heads(attn, proj(merged)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            out = output_projection(attn, F.scaled_dot_product_attention(q, k, v, scale=attn.scale))
        return out.index_select(1, self.back)


def lean_free_forward(block, processor):
    """block.forward for a free plan, as a patched block runs (agentsd/block.py): lean_forward around
    `processor` on attn1 where it applies."""
    replaced = block.forward

    def forward(hidden_states, *args, **kwargs):
        if runs_lean(block, hidden_states, args, kwargs):
            attend = lambda h, residual: processor(block.attn1, h) + residual  # noqa: E731
            return lean_forward(block, hidden_states, kwargs["encoder_hidden_states"], attend)
        return replaced(hidden_states, *args, **kwargs)

    return forward


def grid_of(latent_size, downsample):
    return math.ceil(latent_size[0] / downsample), math.ceil(latent_size[1] / downsample)
