"""Agent self-attention as a trainable layer: linear in sequence length, for any long sequence.

It computes what agent-attention-pytorch 0.1.7's AgentSelfAttention computes, given the same weights
(tests/test_nn.py copies them over); AgentTransformer is in transformer.py.
"""

import torch
from einops import rearrange
from torch import nn

from .functional import agent_attention


class AgentSelfAttention(nn.Module):
    """Self-attention through `num_agent_tokens` learned agent tokens (Han et al. 2024).

    forward(x (B, N, dim), mask=None, agent_tokens=None, return_agent_tokens=False):
    - mask (B, N) bool, True at real tokens: padded tokens are never gathered by the agents, so they
      change no output at real positions, and the output is zero at padded positions;
    - agent_tokens (B, heads, n, dim_head): used instead of the learned tokens (e.g. what an earlier
      layer returned), as in agent-attention-pytorch 0.1.7;
    - return_agent_tokens: also return what the agents gathered, (B, heads, n, dim_head); zeros for a
      sequence with no real token.
    talking_heads mixes the attention maps across heads after each softmax; gate scales each head's
    output by a sigmoid of the token; dropout drops attention weights.
    """

    def __init__(self, dim: int, *, num_agent_tokens: int, dim_head: int = 64, heads: int = 8, dropout: float = 0.0,
                 talking_heads: bool = True, gate: bool = True, combine_agent_tokens: bool = False):  # fmt: skip
        super().__init__()
        _check_sizes(dim=dim, num_agent_tokens=num_agent_tokens, dim_head=dim_head, heads=heads)
        if combine_agent_tokens:
            raise ValueError(
                "combine_agent_tokens=True is not supported (allowed: False): agent-attention-pytorch 0.1.7 "
                "accepts the keyword but never uses it, so it has no behaviour to reproduce"
            )
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.dropout = _checked_dropout(dropout)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.agent_tokens = nn.Parameter(torch.randn(heads, num_agent_tokens, dim_head) * self.scale)
        # Talking heads start as the identity: the layer begins as plain agent attention.
        self.talking_heads = nn.ParameterList([nn.Parameter(torch.eye(heads)) for _ in range(2)]) if talking_heads else None
        self.to_gates = nn.Linear(dim, heads) if gate else None
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)  # no bias, as agent-attention-pytorch 0.1.7

    def forward(self, x, mask=None, agent_tokens=None, return_agent_tokens=False):
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if agent_tokens is None:
            agents = self.agent_tokens.expand(x.shape[0], -1, -1, -1)
        else:
            agents = agent_tokens  # as many as given (an earlier layer's may be more or fewer)
            expected = (x.shape[0], self.heads, self.dim_head)
            if agents.ndim != 4 or (agents.shape[0], agents.shape[1], agents.shape[3]) != expected or not agents.shape[2]:
                raise ValueError(f"agent_tokens must have shape (batch, heads, n >= 1, dim_head) = ({expected[0]}, "
                                 f"{expected[1]}, n, {expected[2]}), got {tuple(agents.shape)}")  # fmt: skip
        out, gathered = agent_attention(
            q, agents, k, v, scale=self.scale, key_padding_mask=mask, return_agent_values=True,
            talking_heads=tuple(self.talking_heads) if self.talking_heads is not None else None,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        if mask is not None:
            # Padded positions output zero, as in agent-attention-pytorch 0.1.7 (to_out has no bias).
            out = out.masked_fill(~rearrange(mask, "b n -> b 1 n 1"), 0.0)
        if self.to_gates is not None:
            out = out * rearrange(self.to_gates(x).sigmoid(), "b n h -> b h n 1")
        out = self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return (out, gathered) if return_agent_tokens else out


def _checked_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    return float(dropout)


def _check_sizes(**sizes) -> None:
    """ValueError naming the first size that is not a whole number >= 1 (0 heads or agents would build a
    layer that fails, or outputs zeros, only when called)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
