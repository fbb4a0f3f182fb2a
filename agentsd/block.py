"""A lean forward for the merged BasicTransformerBlocks of SD 1.x, 2.x and SDXL.

Eager calls at 512px are bound by the host, and diffusers' block spends much of its host time on
generality: BasicTransformerBlock.forward branches over its norm types, Attention.forward reads its
processor's signature with `inspect` at every call, AttnProcessor2_0 checks for norms it does not
have and divides by a rescale factor of 1, FeedForward loops over its layers. `lean_forward`
computes the same, bit for bit (tests/test_block.py), in fewer host steps. It runs only where
diffusers' forward would compute the same: `is_lean` checks the block once, at apply_patch, and
`runs_lean` the call and what a user may change later (processors, hooks, chunked feed-forward). It
calls every module with weights as a module, so hooks on those (LoRA, offloading, layerwise casting)
run as in diffusers' forward.
"""

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .attention import plain_attention, plain_module

# What Transformer2DModel passes to its blocks; lean_forward reads the first and needs the others
# None (the last three only matter to other norm types).
_BLOCK_KWARGS = frozenset(
    ("encoder_hidden_states", "attention_mask", "encoder_attention_mask", "cross_attention_kwargs",
     "timestep", "class_labels", "added_cond_kwargs")
)  # fmt: skip


def is_lean(block: nn.Module) -> bool:
    """Whether lean_forward can compute what diffusers' forward does for `block` (layer norms, GEGLU
    feed-forward, plain Attention modules); runs_lean checks the processors at each call."""
    ff = block.ff
    return (
        type(block) is BasicTransformerBlock
        and block.norm_type == "layer_norm"
        and block.pos_embed is None
        and not block.only_cross_attention
        and block.attn2 is not None
        and not hasattr(block, "fuser")  # GLIGEN
        and type(ff) is FeedForward
        and type(ff.net[0]) is GEGLU
        and len(ff.net) in (3, 4)
        and all(type(m) is nn.Dropout and m.p == 0 for m in (ff.net[1], *ff.net[3:]))
        and plain_module(block.attn1)
        and plain_module(block.attn2)
    )


def runs_lean(block: nn.Module, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether this call of a block of is_lean, whose attn1 the caller found plain, may run lean_forward:
    nothing that diffusers' forward would honour and lean_forward would not (masks, extra arguments,
    chunked feed-forward, another processor on attn2, hooks or wrapped forwards on the modules it calls
    the insides of)."""
    return (
        not args
        and hidden_states.ndim == 3
        and kwargs.get("encoder_hidden_states") is not None
        and kwargs.get("attention_mask") is None
        and kwargs.get("encoder_attention_mask") is None
        and not kwargs.get("cross_attention_kwargs")
        and kwargs.keys() <= _BLOCK_KWARGS
        and block._chunk_size is None
        and type(block.attn2.processor) is AttnProcessor2_0
        and not any(wrapped(m) for m in (block.attn1, block.attn2, block.ff, block.ff.net[0]))
    )


def wrapped(module: nn.Module) -> bool:
    """Hooks on `module`, or a forward set on the instance (accelerate's and diffusers' hooks wrap it so)."""
    return bool(module._forward_pre_hooks or module._forward_hooks) or "forward" in module.__dict__


def lean_forward(block: nn.Module, x: torch.Tensor, context: torch.Tensor, self_attention) -> torch.Tensor:
    """BasicTransformerBlock.forward of a block of is_lean: x (B, N, C), context (B, M, C') -> (B, N, C).
    self_attention(h, x) (B, N, C) -> (B, N, C) takes the place of block.attn1(h) + x (a merged
    block adds x as it unmerges: one pass less)."""
    x = self_attention(block.norm1(x), x)
    x = plain_attention(block.attn2, block.norm2(x), context) + x
    geglu = block.ff.net[0]
    h, gate = geglu.proj(block.norm3(x)).chunk(2, dim=-1)
    return block.ff.net[2](h * geglu.gelu(gate)) + x
