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
    also returns V_A. Shapes that do not fit raise ValueError naming the argument (none is broadcast).
    """
    _check_inputs(q, agents, k, v, agent_keys, talking_heads, shortcut, dropout_p)
    return _agent_attention(q, agents, k, v, scale=scale, agent_scale=agent_scale, shortcut=shortcut,
                            key_padding_mask=key_padding_mask, talking_heads=talking_heads, agent_keys=agent_keys,
                            dropout_p=dropout_p, return_agent_values=return_agent_values)  # fmt: skip


def _agent_attention(q, agents, k, v, *, scale=None, agent_scale=None, shortcut=0.0, key_padding_mask=None,
                     talking_heads=None, agent_keys=None, dropout_p=0.0, return_agent_values=False):  # fmt: skip
    """agent_attention without the checks of its inputs: for callers whose shapes are right by
    construction (the Stable Diffusion patch, on the host's time of every merged block)."""
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


def _check_inputs(q, agents, k, v, agent_keys, talking_heads, shortcut, dropout_p):
    """ValueError naming the first argument whose shape, dtype or value does not fit the others."""
    named = dict(q=q, agents=agents, k=k, v=v) | ({} if agent_keys is None else dict(agent_keys=agent_keys))
    for name, tensor in named.items():
        if not torch.is_tensor(tensor) or tensor.ndim != 4:
            got = f"shape {tuple(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a tensor (batch, heads, tokens, dim_head), got {got}")
    batch, heads, queries, dim_head = q.shape
    got = lambda name: f"got shape {tuple(named[name].shape)}, {named[name].dtype}"  # noqa: E731 (only when wrong)
    problems = [
        *(f"{name} must have q's batch and heads {batch, heads}, {got(name)}" for name, t in named.items() if t.shape[:2] != q.shape[:2]),
        *(f"{name} must have q's dim_head {dim_head}, {got(name)}" for name, t in named.items() if name != "v" and t.shape[3] != dim_head),
        *(f"{name} must have q's dtype {q.dtype}, {got(name)}" for name, t in named.items() if t.dtype != q.dtype),
        *([f"v must have as many tokens as k ({k.shape[2]}), {got('v')}"] if v.shape[2] != k.shape[2] else []),
        *([f"agent_keys must be as many as agents ({agents.shape[2]}), {got('agent_keys')}"]
          if agent_keys is not None and agent_keys.shape[2] != agents.shape[2] else []),
        *([f"shortcut adds v to the output, so q and k need as many tokens, got {queries} and {k.shape[2]}"]
          if shortcut and queries != k.shape[2] else []),
        *([f"dropout_p must be a probability in [0, 1], got {dropout_p}"] if not 0.0 <= dropout_p <= 1.0 else []),
    ]  # fmt: skip
    if talking_heads is not None and (
        len(talking_heads) != 2 or any(not torch.is_tensor(m) or tuple(m.shape) != (heads, heads) for m in talking_heads)
    ):
        shapes = [tuple(m.shape) if torch.is_tensor(m) else type(m).__name__ for m in talking_heads]
        problems.append(f"talking_heads must be two ({heads}, {heads}) tensors (gather mix, broadcast mix), got {shapes}")
    if problems:
        raise ValueError(problems[0])


def _check_key_padding_mask(mask, k):
    batch, _, keys, _ = k.shape
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, keys):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape (batch, keys) = ({batch}, {keys}), True at real "
            f"keys; got {f'{mask.dtype} of shape {tuple(mask.shape)}' if torch.is_tensor(mask) else type(mask).__name__}"
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
