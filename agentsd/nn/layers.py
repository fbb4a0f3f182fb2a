"""Trainable agent-attention layers: linear in sequence length, for any long sequence."""

import torch
from einops import rearrange
from torch import nn

from .functional import agent_attention


class AgentSelfAttention(nn.Module):
    """Self-attention through `num_agent_tokens` learned agent tokens (Han et al. 2024).

    forward(x (B, N, dim), mask=None, agent_tokens=None, return_agent_tokens=False):
    - mask (B, N) bool, True at real tokens: padded tokens are never gathered by the agents, so they
      change no output at real positions;
    - agent_tokens (B, heads, n, dim_head): agent state carried from an earlier layer, added to this
      layer's learned tokens;
    - return_agent_tokens: also return what the agents gathered, (B, heads, n, dim_head).
    talking_heads mixes the attention maps across heads after each softmax; gate scales each head's
    output by a sigmoid of the token.
    """

    def __init__(self, dim: int, num_agent_tokens: int, *, dim_head: int = 64, heads: int = 8, dropout: float = 0.0,
                 talking_heads: bool = True, gate: bool = True):  # fmt: skip
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.agent_tokens = nn.Parameter(torch.randn(heads, num_agent_tokens, dim_head) * self.scale)
        # Talking heads start as the identity: the layer begins as plain agent attention.
        self.talking_heads = nn.ParameterList([nn.Parameter(torch.eye(heads)) for _ in range(2)]) if talking_heads else None
        self.to_gates = nn.Linear(dim, heads) if gate else None
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))

    def forward(self, x, mask=None, agent_tokens=None, return_agent_tokens=False):
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        agents = self.agent_tokens.expand(x.shape[0], -1, -1, -1)
        if agent_tokens is not None:
            agents = agents + agent_tokens
        out, gathered = agent_attention(
            q, agents, k, v, scale=self.scale, key_padding_mask=mask, return_agent_values=True,
            talking_heads=tuple(self.talking_heads) if self.talking_heads is not None else None,
        )  # fmt: skip
        if self.to_gates is not None:
            out = out * rearrange(self.to_gates(x).sigmoid(), "b n h -> b h n 1")
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return (out, gathered) if return_agent_tokens else out


class AgentTransformer(nn.Module):
    """Pre-norm residual blocks of AgentSelfAttention and a feed-forward; the agent tokens are carried
    from layer to layer (each adds what it gathered). forward(x, mask=None) -> (out, agent_tokens)."""

    def __init__(self, dim: int, depth: int, num_agent_tokens: int, *, dim_head: int = 64, heads: int = 8,
                 ff_mult: int = 4, final_norm: bool = True, **attn_kwargs):  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([
                nn.LayerNorm(dim),
                AgentSelfAttention(dim, num_agent_tokens, dim_head=dim_head, heads=heads, **attn_kwargs),
                nn.LayerNorm(dim),
                nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim)),
            ])  # fmt: skip
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, x, mask=None):
        agents = None
        for attn_norm, attn, ff_norm, ff in self.layers:
            out, gathered = attn(attn_norm(x), mask=mask, agent_tokens=agents, return_agent_tokens=True)
            x = x + out
            agents = gathered if agents is None else agents + gathered
            x = x + ff(ff_norm(x))
        return self.norm(x), agents
