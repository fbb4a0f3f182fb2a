"""A slow, plain reference of AgentSD, written from ALGORITHM.md with loops and float64.

It shares no code with the package: matching, grouping and unmerging are Python loops over
token positions, both attentions are written-out softmaxes. `reference_block_forward` replaces a
diffusers BasicTransformerBlock's forward (layer-norm blocks, as in SD and SDXL).
"""

import math

import torch


def destination_positions(h, w, sy, sx, offsets=None):
    """Step 1: one destination per complete cell; `offsets[cy][cx]` picks it (default top-left)."""
    positions = []
    for cy in range(h // sy):
        for cx in range(w // sx):
            offset = 0 if offsets is None else offsets[cy][cx]
            positions.append((cy * sy + offset // sx) * w + cx * sx + offset % sx)
    return positions


def groups_of(order, best, src, dst, num_merged):
    """Each token of the merged sequence as the list of original positions it averages."""
    dst_groups = [[p] for p in dst]
    unmerged = []
    for rank, i in enumerate(order):
        if rank < num_merged:
            dst_groups[best[i]].append(src[i])
        else:
            unmerged.append([src[i]])
    return unmerged + dst_groups


def softmax_attention(q, k, v, scale):
    weights = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)
    return weights @ v


def reference_self_attention(attn, x, y, h, w, *, sx, sy, ratio, agent_ratio, k_scale2, k_shortcut, offsets=None):
    """attn1 of one block under AgentSD: x is the block input (metric), y = norm1(x)."""
    batch, n_tokens, _ = x.shape
    heads = attn.heads

    def project(linear, tokens):  # float64 copy of a projection
        return tokens @ linear.weight.double().T + (0 if linear.bias is None else linear.bias.double())

    def split_heads(t):
        return t.reshape(t.shape[0], heads, -1).transpose(0, 1)  # (H, L, d)

    dst = destination_positions(h, w, sy, sx, offsets)
    dst_set = set(dst)
    src = [p for p in range(n_tokens) if p not in dst_set]
    requested = math.floor(n_tokens * ratio)
    t = min(requested, len(src))
    t_a = min(math.floor(n_tokens * agent_ratio), len(src))
    use_agents = 2 * (n_tokens - t_a) < n_tokens - t
    scale = attn.scale

    out = torch.zeros(batch, n_tokens, attn.to_out[0].out_features, dtype=torch.float64, device=x.device)
    for b in range(batch):
        yb = y[b].double()
        if requested <= 0:  # the block runs unpatched
            groups = [[p] for p in range(n_tokens)]
        else:
            metric = x[b].double()
            metric = metric / metric.norm(dim=-1, keepdim=True)
            sims = metric[src] @ metric[dst].T
            best = [int(sims[i].argmax()) for i in range(len(src))]
            best_score = [float(sims[i, best[i]]) for i in range(len(src))]
            order = sorted(range(len(src)), key=lambda i: -best_score[i])
            groups = groups_of(order, best, src, dst, t)
        merged = torch.stack([yb[g].mean(0) for g in groups])
        q = split_heads(project(attn.to_q, merged))
        k = split_heads(project(attn.to_k, merged))
        v = split_heads(project(attn.to_v, merged))
        if requested > 0 and use_agents:
            agents = torch.stack([yb[g].mean(0) for g in groups_of(order, best, src, dst, t_a)])
            a = split_heads(project(attn.to_q, agents))
            agent_values = softmax_attention(a, k, v, scale)
            o = softmax_attention(q, a, agent_values, scale**k_scale2) + k_shortcut * v
        else:
            o = softmax_attention(q, k, v, scale)
        o = o.transpose(0, 1).reshape(len(groups), -1)
        o = project(attn.to_out[0], o)
        for token, group in enumerate(groups):
            for position in group:
                out[b, position] = o[token]
    return out.to(y.dtype)


def reference_block_forward(block, latent_size, settings, max_downsample):
    """A forward for `block` that applies the reference to attn1 at levels <= max_downsample."""

    def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, **kwargs):
        x = hidden_states
        n_tokens = x.shape[1]
        latent_h, latent_w = latent_size
        downsample = math.ceil(math.sqrt(latent_h * latent_w / n_tokens))
        y = block.norm1(x)
        if downsample <= max_downsample:
            h, w = math.ceil(latent_h / downsample), math.ceil(latent_w / downsample)
            x = x + reference_self_attention(block.attn1, x, y, h, w, **settings)
        else:
            x = x + block.attn1(y)
        x = x + block.attn2(block.norm2(x), encoder_hidden_states=encoder_hidden_states)
        return x + block.ff(block.norm3(x))

    return forward
