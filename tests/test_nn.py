"""agentsd.nn: the op against a naive einsum version, masking (also fully padded rows), gradients,
learning a small task, and agreement with agent-attention-pytorch 0.1.7 given its weights."""

import re

import pytest
import torch

from agentsd.nn import AgentSelfAttention, AgentTransformer
from agentsd.nn.functional import agent_attention


def naive(q, agents, k, v, scale, agent_scale, shortcut, mask=None, mixes=None, agent_keys=None):
    gather = torch.einsum("bhid,bhjd->bhij", agents, k) * scale
    if mask is not None:
        gather = gather.masked_fill(~mask[:, None, None, :], float("-inf"))
    gather = gather.softmax(-1)
    keys = agents if agent_keys is None else agent_keys
    broadcast = (torch.einsum("bhid,bhjd->bhij", q, keys) * agent_scale).softmax(-1)
    if mixes is not None:
        gather = torch.einsum("hg,bgij->bhij", mixes[0], gather)
        broadcast = torch.einsum("hg,bgij->bhij", mixes[1], broadcast)
    agent_values = gather @ v
    return broadcast @ agent_values + shortcut * v


def op_inputs(generator, batch=2):
    q, k, v = (torch.randn(batch, 4, 50, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    agents, agent_keys = (torch.randn(batch, 4, 6, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mixes = tuple(torch.randn(4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    return q, agents, k, v, agent_keys, mixes


@pytest.mark.parametrize("separate_agent_keys", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("talking", [False, True])
def test_op_equals_naive(masked, talking, separate_agent_keys):
    g = torch.Generator().manual_seed(0)
    q, agents, k, v, agent_keys, mixes = op_inputs(g)
    mask = torch.rand(2, 50, generator=g) > 0.3 if masked else None
    mixes = mixes if talking else None
    agent_keys = agent_keys if separate_agent_keys else None
    got = agent_attention(q, agents, k, v, scale=0.3, agent_scale=0.7, shortcut=0.1, key_padding_mask=mask,
                          talking_heads=mixes, agent_keys=agent_keys)  # fmt: skip
    torch.testing.assert_close(got, naive(q, agents, k, v, 0.3, 0.7, 0.1, mask, mixes, agent_keys))


@pytest.mark.parametrize("talking", [False, True])
def test_op_fully_padded_row_is_finite(talking):
    g = torch.Generator().manual_seed(1)
    inputs = [t.requires_grad_() for t in op_inputs(g, batch=3)[:4]]
    q, agents, k, v = inputs
    mixes = tuple(m.requires_grad_() for m in op_inputs(g)[5]) if talking else None
    mask = torch.rand(3, 50, generator=g) > 0.3
    mask[1] = False
    out, gathered = agent_attention(q, agents, k, v, scale=0.3, key_padding_mask=mask, talking_heads=mixes,
                                    return_agent_values=True)  # fmt: skip
    assert out.isfinite().all()
    assert (gathered[1] == 0).all()  # an empty sequence gathers nothing
    real = [0, 2]
    expected = naive(*(t.detach()[real] for t in inputs), 0.3, 0.3, 0.0, mask[real],
                     None if mixes is None else [m.detach() for m in mixes])  # fmt: skip
    torch.testing.assert_close(out[real], expected)
    out.square().sum().backward()
    for t in [*inputs, *(mixes or [])]:
        assert t.grad.isfinite().all()


def test_op_rejects_a_bad_mask():
    q, agents, k, v = op_inputs(torch.Generator().manual_seed(0))[:4]
    for mask in (torch.ones(2, 50), torch.ones(2, 49, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(batch, keys\)"):
            agent_attention(q, agents, k, v, key_padding_mask=mask)


@pytest.mark.parametrize("model", ["attention", "transformer"])
def test_shapes_and_padding(model):
    torch.manual_seed(0)
    if model == "attention":
        net = AgentSelfAttention(32, num_agent_tokens=8, dim_head=16, heads=4)
        agent_shape = (3, 4, 8, 16)
    else:
        net = AgentTransformer(32, num_agent_tokens=8, depth=2, dim_head=16, heads=4)
        agent_shape = (3, 8, 32)
    x = torch.randn(3, 40, 32)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[0, 30:] = False
    mask[2, 5:] = False
    out, agents = net(x, mask=mask, return_agent_tokens=True)
    assert out.shape == (3, 40, 32) and agents.shape == agent_shape
    changed = x.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 32) * 100  # new values at padded positions only
    out2, agents2 = net(changed, mask=mask, return_agent_tokens=True)
    torch.testing.assert_close(out2[mask], out[mask])
    torch.testing.assert_close(agents2, agents)
    full, full_agents = net(x, mask=torch.ones(3, 40, dtype=torch.bool), return_agent_tokens=True)
    none, none_agents = net(x, return_agent_tokens=True)
    torch.testing.assert_close(full, none)
    torch.testing.assert_close(full_agents, none_agents)
    torch.testing.assert_close(net(x, mask=mask), out)


@pytest.mark.parametrize("model", ["attention", "transformer"])
@pytest.mark.parametrize("talking", [False, True])
def test_fully_padded_row_in_a_batch(model, talking):
    # one empty sequence among real ones: finite outputs and gradients everywhere, the real rows as if alone
    torch.manual_seed(0)
    if model == "attention":
        net = AgentSelfAttention(16, num_agent_tokens=4, dim_head=8, heads=2, talking_heads=talking).double()
    else:
        net = AgentTransformer(16, num_agent_tokens=4, depth=2, dim_head=8, heads=2, talking_heads=talking).double()
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    mask = torch.rand(3, 12) > 0.3
    mask[1] = False

    def loss_and_grads(rows):
        net.zero_grad()
        out, agents = net(x[rows], mask=mask[rows], return_agent_tokens=True)
        (out.square().sum() + agents.square().sum()).backward()
        return out, agents, {name: p.grad.clone() for name, p in net.named_parameters()}

    out, agents, grads = loss_and_grads([0, 1, 2])
    assert out.isfinite().all() and agents.isfinite().all()
    assert all(g.isfinite().all() for g in grads.values())
    real_out, real_agents, real_grads = loss_and_grads([0, 2])
    torch.testing.assert_close(out[[0, 2]], real_out)
    torch.testing.assert_close(agents[[0, 2]], real_agents)
    if model == "attention":
        assert (out[1] == 0).all() and (agents[1] == 0).all()
        for name, grad in grads.items():  # the empty row adds nothing to any gradient
            torch.testing.assert_close(grad, real_grads[name], msg=name)


def test_agent_tokens_replace_the_learned_ones():
    torch.manual_seed(0)
    net = AgentSelfAttention(16, num_agent_tokens=4, dim_head=8, heads=2)
    x = torch.randn(2, 10, 16)
    learned = net.agent_tokens.detach().expand(2, -1, -1, -1)
    torch.testing.assert_close(net(x, agent_tokens=learned), net(x))
    other = torch.randn(2, 2, 4, 8)
    with torch.no_grad():
        net.agent_tokens.copy_(other[0])
    torch.testing.assert_close(net(x, agent_tokens=other)[:1], net(x[:1]))  # nothing of the old tokens is added
    with pytest.raises(ValueError, match=r"agent_tokens must have shape \(batch, heads, n >= 1, dim_head\) = \(2, 2, n, 8\)"):
        net(x, agent_tokens=other[:1])  # not broadcast over the batch


def test_constructor_keywords():
    AgentSelfAttention(16, num_agent_tokens=4, combine_agent_tokens=False)
    with pytest.raises(ValueError, match=r"combine_agent_tokens=True is not supported \(allowed: False\)"):
        AgentSelfAttention(16, num_agent_tokens=4, combine_agent_tokens=True)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['combine_agent_tokens'\].*sub_layernorm"):
        AgentTransformer(16, num_agent_tokens=4, depth=1, combine_agent_tokens=False)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\]"):
        AgentSelfAttention(16, num_agent_tokens=4, dropout=1.5)
    with pytest.raises(TypeError):  # keyword-only, as in agent-attention-pytorch 0.1.7
        AgentSelfAttention(16, 4)


@pytest.mark.parametrize("make, message", [
    (lambda: AgentSelfAttention(16, num_agent_tokens=4, heads=0), "heads must be a whole number >= 1, got 0"),
    (lambda: AgentSelfAttention(16, num_agent_tokens=0), "num_agent_tokens must be a whole number >= 1, got 0"),
    (lambda: AgentSelfAttention(16, num_agent_tokens=4, dim_head=-2), "dim_head must be a whole number >= 1, got -2"),
    (lambda: AgentSelfAttention(16, num_agent_tokens=4, heads=2.0), "heads must be a whole number >= 1, got 2.0"),
    (lambda: AgentSelfAttention(16, num_agent_tokens=4, dropout=None), r"dropout must be a probability in \[0, 1\], got None"),
    (lambda: AgentSelfAttention(16, num_agent_tokens=4, dropout=True), r"dropout must be a probability in \[0, 1\], got True"),
    (lambda: AgentTransformer(16, num_agent_tokens=4, depth=0), "depth must be a whole number >= 1, got 0"),
    (lambda: AgentTransformer(16, num_agent_tokens=4, depth=1, ff_mult=0), "ff_mult must be a number > 0, got 0"),
    (lambda: AgentTransformer(-1, num_agent_tokens=4, depth=1), "dim must be a whole number >= 1, got -1"),
])  # fmt: skip
def test_sizes_out_of_range_are_refused_when_built(make, message):
    """Not at the first call (0 heads: a ZeroDivisionError inside einops) or never (0 agents: zeros out)."""
    with pytest.raises(ValueError, match=message):
        make()


def test_op_rejects_inputs_that_do_not_fit_naming_them():
    """No broadcasting and no silent mismatch: SDPA on the CPU takes 3 values for 5 keys without a word."""
    q, agents, k, v, agent_keys, mixes = op_inputs(torch.Generator().manual_seed(0))
    cases = [
        (dict(v=v[:, :, :30]), "v must have as many tokens as k (50)"),
        (dict(agents=agents[:1]), "agents must have q's batch and heads (2, 4)"),
        (dict(k=k[:, :1]), "k must have q's batch and heads (2, 4)"),
        (dict(agents=agents[0]), "agents must be a tensor (batch, heads, tokens, dim_head), got shape (4, 6, 8)"),
        (dict(agents=agents[..., :4]), "agents must have q's dim_head 8"),
        (dict(agents=agents.float()), "agents must have q's dtype torch.float64"),
        (dict(agent_keys=agent_keys[:, :, :2]), "agent_keys must be as many as agents (6)"),
        (dict(q=q[:, :, :10], shortcut=0.5), "shortcut adds v to the output, so q and k need as many tokens, got 10 and 50"),
        (dict(dropout_p=-0.5), "dropout_p must be a probability in [0, 1], got -0.5"),
        (dict(talking_heads=(mixes[0], mixes[1][:3, :3])), "talking_heads must be two (4, 4) tensors"),
        (dict(key_padding_mask=[[True] * 50] * 2), "key_padding_mask must be a bool tensor of shape (batch, keys) = (2, 50)"),
    ]  # fmt: skip
    for changed, message in cases:
        inputs = dict(q=q, agents=agents, k=k, v=v) | changed
        with pytest.raises(ValueError, match=re.escape(message)):
            agent_attention(**inputs)


@pytest.mark.parametrize("talking", [False, True])
def test_dropout_drops_attention_weights_in_training_only(talking):
    torch.manual_seed(0)
    net = AgentSelfAttention(16, num_agent_tokens=4, dim_head=8, heads=2, dropout=0.5, talking_heads=talking)
    plain = AgentSelfAttention(16, num_agent_tokens=4, dim_head=8, heads=2, talking_heads=talking)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 10, 16)
    assert not torch.allclose(net(x), plain(x))
    net.eval()
    torch.testing.assert_close(net(x), plain(x), rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    net = AgentTransformer(16, num_agent_tokens=4, depth=2, dim_head=8, heads=2, sub_layernorm=True)
    out, agents = net(torch.randn(2, 12, 16), mask=torch.rand(2, 12) > 0.2, return_agent_tokens=True)
    (out.square().mean() + agents.square().mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_learns_a_global_task():
    # each position must output the mean of the sequence's first feature: only attention can see it
    torch.manual_seed(0)
    net = AgentTransformer(32, num_agent_tokens=8, depth=2, dim_head=16, heads=4)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(120):  # the loss falls to 5-8% of its start by step 100 (seeds 0, 1)
        x = torch.randn(16, 24, 32)
        target = x[..., :1].mean(dim=1, keepdim=True).expand(-1, 24, -1) * 4
        loss = torch.nn.functional.mse_loss(head(net(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.2 * start, (start, end)


# agent-attention-pytorch 0.1.7 (lucidrains): agentsd.nn is a drop-in for it.

# Its parameter names -> agentsd's. Talking heads are 1x1 convolutions there, (H, H) matrices here;
# "ak" mixes the map of the agents gathering (agentsd's first mix), "qa" the broadcast (the second).
UPSTREAM_NAMES = [
    (r"\.gamma$", ".weight"),
    (r"(to_qkv|to_gates)\.0\.", r"\1."),
    (r"ak_talking_heads\.weight$", "talking_heads.0"),
    (r"qa_talking_heads\.weight$", "talking_heads.1"),
    (r"to_out\.1\.", "to_out."),  # AgentSelfAttention: (Rearrange, Linear)
    (r"(to_out|to_agent_out)\.2\.", r"\1."),  # AgentTransformer: (LayerNorm or Identity, Rearrange, Linear)
    (r"to_out\.0\.", "out_norm."),
    (r"to_agent_out\.0\.", "agent_out_norm."),
]


def upstream_to_our_name(name):
    for pattern, replacement in UPSTREAM_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def copy_upstream_weights(upstream, ours):
    """Perturbs every upstream parameter (so that none sits at a neutral init) and loads them into ours;
    strict loading fails if either side has a parameter the other lacks."""
    state = {}
    with torch.no_grad():
        for name, p in upstream.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
            name = upstream_to_our_name(name)
            state[name] = p.detach().reshape(ours.get_parameter(name).shape)
    ours.load_state_dict(state, strict=True)


def compare_with_upstream(upstream, ours, x, mask, empty_rows, **call):
    """In float64 the outputs and returned agent tokens agree to 1e-14 and the gradients of the input and of
    every parameter to 1e-13 (2-4e-14 seen through two blocks), relative to each tensor's largest value.
    The agent tokens of an empty sequence differ on purpose (upstream's gather a mean of the padded
    tokens, ours nothing): left out."""
    results = []
    for net in (upstream, ours):
        net.zero_grad()
        xg = x.clone().requires_grad_()
        out, agents = net(xg, mask=mask, return_agent_tokens=True, **call)
        real = [i for i in range(len(x)) if i not in empty_rows]
        (out.square().sum() + agents[real].square().sum()).backward()
        results.append({"out": out, "agents": agents[real], "x.grad": xg.grad})
    for name, p in upstream.named_parameters():
        name = upstream_to_our_name(name)
        results[0][name] = p.grad if p.grad is None else p.grad.reshape(ours.get_parameter(name).shape)
    for name, p in ours.named_parameters():
        results[1][name] = p.grad
    assert results[0].keys() == results[1].keys()
    for name, theirs in results[0].items():
        mine = results[1][name]
        if theirs is None:  # the learned agent tokens when agent_tokens= replaces them
            assert mine is None, name
            continue
        assert mine.isfinite().all() and theirs.abs().max() > 0, name
        tolerance = (1e-14 if name in ("out", "agents") else 1e-13) * theirs.abs().max().item()
        torch.testing.assert_close(mine, theirs, rtol=0, atol=tolerance, msg=name)


def test_readme_snippets_of_agent_attention_pytorch():
    # its README's two snippets with the import changed (and 65536 tokens cut to 64, for speed)
    attn = AgentSelfAttention(dim=512, num_agent_tokens=256, dim_head=64, heads=8)
    x = torch.randn(3, 64, 512)
    mask = torch.ones(3, 64).bool()
    out = attn(x, mask=mask)
    assert out.shape == x.shape

    transformer = AgentTransformer(dim=512, depth=6, num_agent_tokens=128, dim_head=64, heads=8)
    out, agent_tokens = transformer(x, mask=mask, return_agent_tokens=True)
    assert out.shape == x.shape and agent_tokens.shape == (3, 128, 512)


def batch_with_padding(masked):
    """x (3, 20, 32) float64; with `masked`, a random padding mask whose third row is all padding."""
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    if not masked:
        return x, None, []
    mask = torch.rand(3, 20) > 0.3
    mask[2] = False
    return x, mask, [2]


def paired_self_attention(**options):
    """agent-attention-pytorch's AgentSelfAttention (32 wide, 4 heads of 8, 6 agents) and ours with its
    weights, in float64, from seed 0."""
    upstream_module = pytest.importorskip("agent_attention_pytorch")
    torch.manual_seed(0)
    options = dict(num_agent_tokens=6, dim_head=8, heads=4, **options)
    upstream = upstream_module.AgentSelfAttention(32, **options).double()
    ours = AgentSelfAttention(32, **options).double()
    copy_upstream_weights(upstream, ours)
    return upstream, ours


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("talking, gate", [(True, True), (False, False)])
def test_self_attention_matches_agent_attention_pytorch(masked, talking, gate):
    upstream, ours = paired_self_attention(talking_heads=talking, gate=gate)
    x, mask, empty_rows = batch_with_padding(masked)
    compare_with_upstream(upstream, ours, x, mask, empty_rows)
    # agent_tokens= replaces the learned tokens in both, as many as given (an earlier layer's, say)
    for agents in (6, 3):
        carried = torch.randn(3, 4, agents, 8, dtype=torch.float64)
        compare_with_upstream(upstream, ours, x, mask, empty_rows, agent_tokens=carried)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("talking, gate, sub_layernorm", [(True, True, True), (False, False, False)])
def test_transformer_matches_agent_attention_pytorch(masked, talking, gate, sub_layernorm):
    upstream_module = pytest.importorskip("agent_attention_pytorch")
    torch.manual_seed(0)
    options = dict(num_agent_tokens=6, depth=2, dim_head=8, heads=4, ff_mult=2, talking_heads=talking, gate=gate,
                   sub_layernorm=sub_layernorm)  # fmt: skip
    upstream = upstream_module.AgentTransformer(32, **options).double()
    ours = AgentTransformer(32, **options).double()
    copy_upstream_weights(upstream, ours)
    x, mask, empty_rows = batch_with_padding(masked)
    compare_with_upstream(upstream, ours, x, mask, empty_rows)


def test_second_derivatives_without_talking_heads_through_the_math_kernel():
    """A gradient penalty: without talking heads both products are SDPA calls, whose fused kernels have no
    second derivative; under sdpa_kernel(SDPBackend.MATH) it agrees with agent-attention-pytorch's einsums."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    upstream, ours = paired_self_attention(talking_heads=False, gate=True)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    penalties = []
    for net in (upstream, ours):
        xg = x.clone().requires_grad_()
        with sdpa_kernel(SDPBackend.MATH):
            (grad,) = torch.autograd.grad(net(xg).square().sum(), xg, create_graph=True)
            (second,) = torch.autograd.grad(grad.square().sum(), xg)
        penalties.append(second)
    assert penalties[1].abs().max() > 0
    torch.testing.assert_close(penalties[1], penalties[0], rtol=0, atol=1e-12 * penalties[0].abs().max().item())
