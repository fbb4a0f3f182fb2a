"""The diffusers attention processor of AgentSD's self-attention (steps 3-6 of ALGORITHM.md)."""

import torch
import torch.nn.functional as F

from .merge import merge, merge_with_agents, unmerge
from .nn.functional import agent_attention


class AgentSDAttnProcessor:
    """Self-attention on merged tokens: merge -> agent or plain attention -> unmerge.

    Reads the merge plan that the block's pre-hook left in `block_merge.plan`. Without a plan
    (unpatched level, ratio too small, a mask or another sequence length) it calls the processor
    it replaced, unchanged; plain ToMe attention also runs through that processor unless
    `upcast` asks for float32 similarities.
    """

    def __init__(self, original, block_merge, *, k_scale2: float, k_shortcut: float, upcast: bool):
        self.original = original
        self.block_merge = block_merge
        self.k_scale2 = k_scale2
        self.k_shortcut = k_shortcut
        self.upcast = upcast

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        plan = self.block_merge.plan_of(attn)
        if plan is None or attention_mask is not None or hidden_states.shape[1] != plan.slot.shape[1]:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

        if plan.num_agent_merged is not None and encoder_hidden_states is None:
            return unmerge(self.agent_attention(attn, *merge_with_agents(hidden_states, plan)), plan)
        merged = merge(hidden_states, plan)
        if self.upcast:
            out = self.float32_attention(attn, merged, encoder_hidden_states)
        else:
            out = self.original(attn, merged, encoder_hidden_states, None, **kwargs)
        return unmerge(out, plan)

    def agent_attention(self, attn, x: torch.Tensor, agents: torch.Tensor) -> torch.Tensor:
        """x (B, N - t, C), agents (B, n, C) -> (B, N - t, C)."""
        q, k, v, a = (
            self._heads(attn, proj(tokens))
            for proj, tokens in ((attn.to_q, x), (attn.to_k, x), (attn.to_v, x), (attn.to_q, agents))
        )
        dtype = q.dtype
        if self.upcast:
            q, k, v, a = q.float(), k.float(), v.float(), a.float()
        out = agent_attention(
            q, a, k, v, scale=attn.scale, agent_scale=attn.scale**self.k_scale2, shortcut=self.k_shortcut
        )
        return self._out(attn, out.to(dtype))

    def float32_attention(self, attn, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (self._heads(attn, proj(t)) for proj, t in ((attn.to_q, x), (attn.to_k, context), (attn.to_v, context)))
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=attn.scale)
        return self._out(attn, out.to(q.dtype))

    # view and transpose, not einops: a few microseconds less per call, and eager calls at 512px
    # are bound by the host
    @staticmethod
    def _heads(attn, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # b n (h d) -> b h n d

    @staticmethod
    def _out(attn, x: torch.Tensor) -> torch.Tensor:
        x = attn.to_out[1](attn.to_out[0](x.transpose(1, 2).flatten(2)))  # b h n d -> b n (h d)
        return x if attn.rescale_output_factor == 1 else x / attn.rescale_output_factor  # one launch less
