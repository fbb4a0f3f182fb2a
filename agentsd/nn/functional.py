"""Agent attention as one op (Han et al., "Agent Attention", ECCV 2024, arXiv 2312.08874)."""

import math

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
    talking_heads: tuple[torch.Tensor, torch.Tensor] | None = None,
    agent_keys: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_agent_values: bool = False,
):
    """Agents gather from the keys and values, then broadcast to the queries.

        V_A = softmax(scale * A K^T) V              (B, H, n, d)
        O   = softmax(agent_scale * Q A'^T) V_A + shortcut * V      (A' = agent_keys, default A)

    q (B, H, Nq, d), agents (B, H, n, d), k and v (B, H, Nk, d) -> (B, H, Nq, d). Both products are
    ordinary softmax attentions, so each is one fused scaled_dot_product_attention call (with
    talking heads the maps are written out, to be mixed).
    `scale` defaults to d**-0.5 and `agent_scale` to `scale`. `key_padding_mask` (B, Nk) bool, True
    where a key is real, keeps padded keys out of what the agents gather; the agents of a sequence
    with no real key gather zeros. The shortcut adds V itself, so it needs Nq == Nk. `talking_heads`
    = (gather mix, broadcast mix), two (H, H) matrices that mix the attention maps across heads after
    the softmax (Shazeer et al. 2020, "Talking-Heads Attention", arXiv 2003.02436). `agent_keys`
    (B, H, n, d): the agents as the broadcast's keys, when they differ from the agents that gather
    (agent-attention-pytorch 0.1.7's AgentTransformer projects its agent tokens to both).
    `dropout_p` drops attention weights after the softmax, before any mixing. `return_agent_values`
    also returns V_A.
    """
    mask = has_keys = None
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, k)
        # A sequence with no real key would take a softmax over nothing: NaN outputs, and NaN gradients
        # in every parameter from that one batch element. Its agents attend over all of its keys instead
        # (finite), and what they gather is zeroed below: an empty sequence gathers nothing.
        has_keys = key_padding_mask.any(dim=-1)
        mask = (key_padding_mask | ~has_keys[:, None])[:, None, None, :]
    gather_mix, broadcast_mix = talking_heads if talking_heads is not None else (None, None)
    agent_values = _attention(agents, k, v, gather_mix, mask, scale, dropout_p)
    if has_keys is not None:
        agent_values = torch.where(has_keys[:, None, None, None], agent_values, 0.0)
    broadcast_keys = agents if agent_keys is None else agent_keys
    broadcast_scale = scale if agent_scale is None else agent_scale
    out = _attention(q, broadcast_keys, agent_values, broadcast_mix, None, broadcast_scale, dropout_p)
    if shortcut:
        out = torch.add(out, v, alpha=shortcut)
    return (out, agent_values) if return_agent_values else out


def _check_key_padding_mask(mask, k):
    batch, _, keys, _ = k.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, keys):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (batch, keys) = ({batch}, {keys}), True at real "
            f"keys; got {mask.dtype} of shape {tuple(mask.shape)}"
        )


def _attention(q, k, v, mix, mask, scale, dropout_p):
    """softmax(scale q k^T) v, the maps mixed across heads by `mix` (H, H) when given.

    The mixed maps are written out: with few agents a map is (N x n) or (n x N), linear in N, and
    its backward is a few matmuls (letting every head's map attend over every head's values
    instead keeps SDPA but makes its backward H times wider, which is slower).
    """
    if mix is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    maps = logits.softmax(dim=-1)
    if dropout_p:
        maps = F.dropout(maps, dropout_p)
    batch, heads, rows, cols = maps.shape
    mixed = (mix.to(maps.dtype) @ maps.reshape(batch, heads, rows * cols)).view_as(maps)
    return mixed @ v
