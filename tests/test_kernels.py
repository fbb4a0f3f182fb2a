"""The Triton kernels against merge.py's torch code (on CPU through Triton's interpreter)."""

import pytest
import torch

from agentsd import kernels, merge

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def torch_path():
    """Call merge.py's functions with the kernels off (they are off on the CPU anyway)."""
    enabled = kernels.ENABLED
    kernels.ENABLED = False
    yield
    kernels.ENABLED = enabled


def inputs(dtype, batch=2, grid=merge.Grid(2, 12, 20), stride=(2, 4), channels=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid.height * grid.width, channels, generator=g).to(DEVICE, dtype)
    return x, merge.choose_destinations(grid, *stride, key=merge.random_key(seed, 500), device=DEVICE)


@pytest.mark.parametrize("key", [None, merge.random_key(3, 981), "tensor"])
def test_destinations(torch_path, key):
    if key == "tensor":
        key = merge.random_key(3, torch.tensor(981.0, device=DEVICE))
    for grid, sy, sx in ((merge.Grid(1, 12, 20), 2, 4), (merge.Grid(2, 7, 10), 4, 4), (merge.Grid(1, 5, 5), 2, 2)):
        expected = merge.choose_destinations(grid, sy, sx, key=key, device=DEVICE)
        got = kernels.destinations(grid.height, grid.width, sy, sx, grid.downsample, key, DEVICE)
        for name, a, b in zip(merge.Destinations._fields, got, expected):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_best_destination(torch_path, dtype):
    x, dst = inputs(dtype)
    score, best = merge.best_destination(x, dst)
    k_score, k_best = kernels.best_destination(x, dst.index, dst.is_dst)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(k_score, score.float(), rtol=tolerance, atol=tolerance)
    # the index agrees wherever the best destination wins by more than the rounding
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)
    top2 = (unit @ unit[:, dst.index].transpose(1, 2)).topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 4 * tolerance
    assert clear.float().mean() > 0.8
    assert torch.equal(k_best[clear], best[clear])
    assert torch.isinf(k_score[:, dst.index]).all()


@pytest.mark.parametrize("agents", [None, 200])
def test_merge_groups(torch_path, agents):
    x, dst = inputs(torch.float32)
    plan = merge.plan_merge(x, dst, 90, agents)
    rank, slot, group = kernels.rank_and_slots(plan.order, plan.best_dst, dst.is_dst, dst.slot, dst.index.numel(), 90)
    assert torch.equal(rank, plan.rank) and torch.equal(slot, plan.slot)
    group, members = group.sort(dim=-1, stable=True)
    starts = torch.searchsorted(group, torch.arange(dst.index.numel() + 1, device=DEVICE).expand(2, -1).contiguous())
    for num_merged, is_agents in ((90, False),) + (((agents, True),) if agents else ()):
        expected = merge.merge(x, plan, agents=is_agents)
        got = kernels.merge_groups(x, members, starts, plan.order, plan.rank, dst.is_dst, dst.index.numel(), num_merged)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    half = kernels.merge_groups(x.half(), members, starts, plan.order, plan.rank, dst.is_dst, dst.index.numel(), 90)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), merge.merge(x, plan), rtol=1e-3, atol=1e-3)
