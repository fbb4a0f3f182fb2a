"""Agent attention as one op (Han et al., "Agent Attention", ECCV 2024, arXiv 2312.08874)."""

import torch
import torch.nn.functional as F


def agent_attention(
    q: torch.Tensor,
    agents: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    agent_scale: float | None = None,
    shortcut: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Agents gather from the keys and values, then broadcast to the queries.

        V_A = softmax(scale * A K^T) V              (B, H, n, d)
        O   = softmax(agent_scale * Q A^T) V_A + shortcut * V

    q (B, H, Nq, d), agents (B, H, n, d), k and v (B, H, Nk, d) -> (B, H, Nq, d). Both products are
    ordinary softmax attentions, so each is one fused scaled_dot_product_attention call.
    `scale` defaults to d**-0.5 and `agent_scale` to `scale`. `key_padding_mask` (B, Nk), True
    where a key is real, keeps padded keys out of what the agents gather. The shortcut adds V
    itself, so it needs Nq == Nk.
    """
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    agent_values = F.scaled_dot_product_attention(agents, k, v, attn_mask=mask, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_values, scale=scale if agent_scale is None else agent_scale)
    if shortcut:
        out = torch.add(out, v, alpha=shortcut)
    return out
