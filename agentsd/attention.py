"""The diffusers attention processor of AgentSD's self-attention (steps 3-6 of ALGORITHM.md)."""

import functools

import torch
import torch.nn.functional as F
from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from .merge import merge, merge_with_agents, unmerge
from .nn.functional import _agent_attention as agent_attention  # its shapes are right by construction here
from .schedule import StagedPlan


# Processors of diffusers that compute softmax(Q K^T / sqrt(d)) V from attn.to_q/to_k/to_v, each its own
# way: agent attention may take their place in the agent stage.
SOFTMAX_PROCESSORS = (
    AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, XFormersAttnProcessor, FusedAttnProcessor2_0, AttnProcessorNPU,
)  # fmt: skip


# Cross-attention processors that read no token positions, so that merge_crossattn may hand them the
# merged queries. Not IP-Adapter's masks, which diffusers lays over the queries as a raster grid (those
# calls run unmerged), nor processors of other code (Attend-and-Excite's keeps the maps of one size).
POSITION_FREE_CROSS_ATTENTION = (
    *SOFTMAX_PROCESSORS, IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor,
    CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0, CustomDiffusionXFormersAttnProcessor,
)  # fmt: skip


class AgentSDAttnProcessor:
    """Self-attention on merged tokens: merge -> agent or plain attention -> unmerge, around `processor`.

    `processor` is the one beneath, which diffusers sees (attn.get_processor()) and replaces
    (set_attn_processor, set_default_attn_processor, attention slicing, IP-Adapter loading): the
    patch wraps every processor set on a patched attn1, so agentsd stays on over it. It reads the merge
    plan that the block's forward left for this call (`patched_block.plan_of`). Without one (unmerged
    level, ratio too small, a mask or another sequence length) it calls `processor`, unchanged. With
    one, plain ToMe attention runs `processor` on the merged tokens (`plain_attention` where that is
    AttnProcessor2_0: the same in fewer host steps), and agent attention takes its place where it is
    one of SOFTMAX_PROCESSORS (else the agent stage is ToMe around it too).
    """

    def __init__(self, patched_block, attn: Attention, processor):
        self.patched_block = patched_block
        self.processor = processor
        self.plain = is_plain(attn, processor)  # plain_attention computes what `processor` does
        self.agents = type(processor) in SOFTMAX_PROCESSORS and plain_module(attn)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        plan = self.patched_block.plan_of(attn)
        if plan is None or attention_mask is not None or hidden_states.shape[1] != plan.num_tokens:
            return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if isinstance(plan, StagedPlan):
            return self.patched_block.patch.over_stages(
                plan,
                lambda p, h: self.merged_attention(attn, h, encoder_hidden_states, p, **kwargs),
                lambda h: self.processor(attn, h, encoder_hidden_states, None, **kwargs),
                hidden_states,
                self.patched_block.attn1_norm(),
            )
        return self.merged_attention(attn, hidden_states, encoder_hidden_states, plan, **kwargs)

    def merged_attention(self, attn, x: torch.Tensor, context: torch.Tensor | None, plan, residual=None, **kwargs) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C) through the merged sequence of `plan` (+ `residual`, added as the
        output is unmerged)."""
        config = self.patched_block.patch.config
        if plan.num_agent_merged is not None and context is None and self.agents:
            merged, agents = merge_with_agents(x, plan)
            return unmerge(agent_attention_of(attn, merged, agents, config), plan, residual)
        merged = merge(x, plan)
        upcast = config.attn_precision == "fp32"
        if (self.plain or upcast) and self.agents:
            out = plain_attention(attn, merged, merged if context is None else context, upcast=upcast)
        else:
            out = self.processor(attn, merged, context, None, **kwargs)
        return unmerge(out, plan, residual)


@functools.cache
def register_with_diffusers_hooks() -> None:
    """diffusers' layer-skip hooks (its skip-layer and perturbed-attention guiders) find how to skip an
    attn1 by its processor's class; for AgentSDAttnProcessor, the way of the processor beneath it."""

    def skip_output(attn, *args, **kwargs):
        beneath = attn.get_processor()  # on a patched attn1: the processor beneath agentsd's
        return AttentionProcessorRegistry.get(type(beneath)).skip_processor_output_fn(attn, *args, **kwargs)

    metadata = AttentionProcessorMetadata(skip_processor_output_fn=skip_output)
    AttentionProcessorRegistry.register(AgentSDAttnProcessor, metadata)


def agent_attention_of(attn, x: torch.Tensor, agents: torch.Tensor, config) -> torch.Tensor:
    """Agent attention of `attn`'s projections: x (B, N - t, C), agents (B, n, C) -> (B, N - t, C)."""
    q, k, v, a = (
        split_heads(attn, proj(tokens))
        for proj, tokens in ((attn.to_q, x), (attn.to_k, x), (attn.to_v, x), (attn.to_q, agents))
    )
    dtype = q.dtype
    if config.attn_precision == "fp32":
        q, k, v, a = q.float(), k.float(), v.float(), a.float()
    out = agent_attention(q, a, k, v, scale=attn.scale, agent_scale=attn.scale**config.k_scale2, shortcut=config.k_shortcut)
    return output_projection(attn, out.to(dtype))


def is_plain(attn: Attention, processor) -> bool:
    """Whether `processor` on `attn` computes exactly plain_attention: diffusers' AttnProcessor2_0 on
    a plain_module."""
    return type(processor) is AttnProcessor2_0 and plain_module(attn)


def plain_module(attn: Attention) -> bool:
    """An Attention without spatial or group norm, query/key norms, residual or output rescaling: what
    its projections and a softmax compute is all it computes."""
    return (
        attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.norm_cross
        and not attn.residual_connection
        and attn.rescale_output_factor == 1
    )


def plain_attention(attn, x: torch.Tensor, context: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """Attention of x (B, N, C) over context (B, M, C') -> (B, N, C), without masks. As
    AttnProcessor2_0 on an Attention of is_plain, bit for bit, in fewer host steps (eager calls at
    512px are bound by the host); `upcast` computes the similarities in float32."""
    q, k, v = (split_heads(attn, proj(t)) for proj, t in ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))
    if upcast:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=attn.scale).to(q.dtype)
    else:  # AttnProcessor2_0 leaves the scale to SDPA's default
        out = F.scaled_dot_product_attention(q, k, v)
    return output_projection(attn, out)


# view and transpose, not einops: a few microseconds less per call
def split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    """A projection's output (B, N, H * d) -> (B, H, N, d)."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # b n (h d) -> b h n d


def output_projection(attn, x: torch.Tensor) -> torch.Tensor:
    """Attention output per head (B, H, N, d) -> attn.to_out of it (B, N, C)."""
    x = attn.to_out[1](attn.to_out[0](x.transpose(1, 2).flatten(2)))  # b h n d -> b n (h d)
    return x if attn.rescale_output_factor == 1 else x / attn.rescale_output_factor  # one launch less
