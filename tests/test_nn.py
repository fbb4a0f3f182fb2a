"""agentsd.nn: the op against a naive einsum version, masking (also fully padded rows), gradients, and
learning a small task."""

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
    net = AgentSelfAttention(32, 8, dim_head=16, heads=4) if model == "attention" else AgentTransformer(32, 2, 8, dim_head=16, heads=4)
    run = (lambda x, m: net(x, mask=m, return_agent_tokens=True)) if model == "attention" else (lambda x, m: net(x, mask=m))
    x = torch.randn(3, 40, 32)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[0, 30:] = False
    mask[2, 5:] = False
    out, agents = run(x, mask)
    assert out.shape == (3, 40, 32) and agents.shape == (3, 4, 8, 16)
    changed = x.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 32) * 100  # new values at padded positions only
    out2, agents2 = run(changed, mask)
    torch.testing.assert_close(out2[mask], out[mask])
    torch.testing.assert_close(agents2, agents)
    full, full_agents = run(x, torch.ones(3, 40, dtype=torch.bool))
    none, none_agents = run(x, None)
    torch.testing.assert_close(full, none)
    torch.testing.assert_close(full_agents, none_agents)


def test_gradients_reach_every_parameter():
    net = AgentTransformer(16, 2, 4, dim_head=8, heads=2)
    out, agents = net(torch.randn(2, 12, 16), mask=torch.rand(2, 12) > 0.2)
    (out.square().mean() + agents.square().mean()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_learns_a_global_task():
    # each position must output the mean of the sequence's first feature: only attention can see it
    torch.manual_seed(0)
    net = AgentTransformer(32, 2, 8, dim_head=16, heads=4)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(300):
        x = torch.randn(16, 24, 32)
        target = x[..., :1].mean(dim=1, keepdim=True).expand(-1, 24, -1) * 4
        loss = torch.nn.functional.mse_loss(head(net(x)[0]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < 0.2 * start, (start, end)
