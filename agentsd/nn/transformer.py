"""AgentTransformer: the architecture of agent-attention-pytorch 0.1.7's AgentTransformer on agentsd's op.

Learned agent tokens of the model's width travel through the blocks beside the sequence: each block's
attention updates both (the agents gather from the sequence, the sequence reads from the agents), and
the feed-forward runs on both. Given the same weights it computes what that package computes
(tests/test_nn.py copies them over).
"""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .functional import agent_attention
from .layers import _check_sizes, _checked_dropout

ATTENTION_OPTIONS = ("dropout", "talking_heads", "gate", "sub_layernorm")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, written as agent-attention-pytorch 0.1.7 does: the unit vector (its norm
    clamped at 1e-12, so a zero token stays zero) times sqrt(dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.weight


def feed_forward(dim: int, mult: float) -> nn.Sequential:
    hidden = int(dim * mult)
    return nn.Sequential(RMSNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class AgentTokenAttention(nn.Module):
    """One AgentTransformer block's attention. forward(x (B, N, dim), agent_tokens (B, n, dim), mask=None)
    -> (update of x (B, N, dim), update of the agent tokens (B, n, dim)).

    Sequence and agents are normed and projected by the same qkv; the agents' queries gather from the
    sequence and their keys broadcast to it. `sub_layernorm` normalizes each head's output before the
    output projections (a LayerNorm over dim_head, as agent-attention-pytorch 0.1.7 does).
    """

    def __init__(self, dim: int, *, dim_head: int = 64, heads: int = 8, dropout: float = 0.0,
                 talking_heads: bool = True, gate: bool = True, sub_layernorm: bool = False):  # fmt: skip
        super().__init__()
        _check_sizes(dim=dim, dim_head=dim_head, heads=heads)
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.dropout = _checked_dropout(dropout)
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        # Talking heads start as the identity, as in AgentSelfAttention.
        self.talking_heads = nn.ParameterList([nn.Parameter(torch.eye(heads)) for _ in range(2)]) if talking_heads else None
        self.to_gates = nn.Linear(dim, heads) if gate else None
        self.out_norm = nn.LayerNorm(dim_head) if sub_layernorm else nn.Identity()
        self.agent_out_norm = nn.LayerNorm(dim_head) if sub_layernorm else nn.Identity()
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.to_agent_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, agent_tokens, mask=None):
        x, agents = self.norm(x), self.norm(agent_tokens)
        q, k, v = self._split_heads(x)
        agent_queries, agent_keys, _ = self._split_heads(agents)
        out, gathered = agent_attention(
            q, agent_queries, k, v, agent_keys=agent_keys, scale=self.scale, key_padding_mask=mask,
            talking_heads=tuple(self.talking_heads) if self.talking_heads is not None else None,
            dropout_p=self.dropout if self.training else 0.0, return_agent_values=True,
        )  # fmt: skip
        if mask is not None:
            out = out.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), 0.0)  # as agent-attention-pytorch 0.1.7
        if self.to_gates is not None:
            out = out * self._gates(x)
            gathered = gathered * self._gates(agents)
        out = self.to_out(rearrange(self.out_norm(out), "b h n d -> b n (h d)"))
        agent_out = self.to_agent_out(rearrange(self.agent_out_norm(gathered), "b h n d -> b n (h d)"))
        return out, agent_out

    def _split_heads(self, tokens):
        return rearrange(self.to_qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)

    def _gates(self, tokens):
        return rearrange(self.to_gates(tokens).sigmoid(), "b n h -> b h n 1")


class AgentTransformer(nn.Module):
    """Residual blocks of AgentTokenAttention and a pre-norm feed-forward, over the sequence and
    `num_agent_tokens` learned agent tokens of width `dim`.

    forward(x (B, N, dim), mask=None, return_agent_tokens=False) -> out (B, N, dim), and with
    return_agent_tokens also the agent tokens (B, num_agent_tokens, dim). `final_norm` RMS-normalizes
    both at the end. Further keywords go to every block's attention: dropout, talking_heads, gate,
    sub_layernorm.
    """

    def __init__(self, dim: int, *, num_agent_tokens: int, depth: int, heads: int = 8, dim_head: int = 64,
                 ff_mult: float = 4, final_norm: bool = True, **attention_options):  # fmt: skip
        super().__init__()
        _check_sizes(dim=dim, num_agent_tokens=num_agent_tokens, depth=depth, heads=heads, dim_head=dim_head)
        if isinstance(ff_mult, bool) or not isinstance(ff_mult, (int, float)) or not ff_mult > 0:
            raise ValueError(f"ff_mult must be a number > 0, got {ff_mult!r}")
        unknown = sorted(set(attention_options) - set(ATTENTION_OPTIONS))
        if unknown:
            raise TypeError(f"AgentTransformer got unknown keyword(s) {unknown}; the attention options are "
                            f"{list(ATTENTION_OPTIONS)}")  # fmt: skip
        # std 0.02, as agent-attention-pytorch 0.1.7 initializes them
        self.agent_tokens = nn.Parameter(torch.randn(num_agent_tokens, dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                AgentTokenAttention(dim, dim_head=dim_head, heads=heads, **attention_options),
                feed_forward(dim, ff_mult),
            ])  # fmt: skip
            for _ in range(depth)
        )
        self.final_norm = RMSNorm(dim) if final_norm else None

    def forward(self, x, mask=None, return_agent_tokens=False):
        agents = repeat(self.agent_tokens, "n d -> b n d", b=x.shape[0])
        for attention, ff in self.layers:
            x_update, agent_update = attention(x, agents, mask=mask)
            x, agents = x + x_update, agents + agent_update
            x, agents = x + ff(x), agents + ff(agents)
        if self.final_norm is not None:
            x, agents = self.final_norm(x), self.final_norm(agents)
        return (x, agents) if return_agent_tokens else x
