"""The merge math on its own: grids, destinations, counts, plans, merge and unmerge."""

import math

import pytest
import torch

from agentsd.merge import (
    Grid,
    choose_destinations,
    merge,
    merge_with_agents,
    merge_counts,
    plan_merge,
    random_key,
    token_grid,
    unmerge,
)


def test_token_grid_rounds_up_odd_latents():
    assert token_grid((64, 64), 64 * 64) == Grid(1, 64, 64)
    assert token_grid((64, 64), 32 * 32) == Grid(2, 32, 32)
    assert token_grid((60, 44), 15 * 11) == Grid(4, 15, 11)  # 60x44 -> 30x22 -> 15x11
    assert token_grid((13, 9), 7 * 5) == Grid(2, 7, 5)


def test_token_grid_is_tomes_formula_in_integers():
    """ceil(sqrt(h w / N)) as ToMe computes it in floats, down four levels of odd and even latents."""
    for h in range(1, 70):
        for w in range(1, 70, 3):
            for level in range(4):
                n = math.ceil(h / 2**level) * math.ceil(w / 2**level)
                d = math.ceil(math.sqrt(h * w / n))
                assert token_grid((h, w), n) == Grid(d, math.ceil(h / d), math.ceil(w / d)), (h, w, level)


def test_merge_counts_follow_the_algorithm():
    n = 64 * 64
    # the paper's agent stage: sx=sy=4, ratio 0.4, agent_ratio 0.95 -> agents are the N/16 destinations
    assert merge_counts(n, n // 16, 0.4, 0.95) == (int(n * 0.4), n - n // 16)
    # the ToMe stage: sx=sy=2, agent_ratio 0.5 -> 2n = N is not below N - t: no agents
    assert merge_counts(n, n // 4, 0.4, 0.5) == (int(n * 0.4), None)
    assert merge_counts(n, n // 4, 0.9, 0.0) == (n - n // 4, None)  # t is capped at the sources
    assert merge_counts(10, 2, 0.05, 0.95) == (0, None)  # floor(N r) = 0: unpatched, no agents either
    assert merge_counts(16, 16, 0.5, 0.95) == (0, None)  # sx = sy = 1: nothing to merge


@pytest.mark.parametrize("seed", [None, 12345])
def test_one_destination_per_complete_cell(seed):
    grid = Grid(1, 7, 10)  # 3 x 3 complete 2x3 cells; a row and a column left over
    dst = choose_destinations(grid, 2, 3, seed, timestep=981)
    assert dst.index.numel() == 9 and dst.is_dst.sum() == 9
    rows, cols = dst.index // 10, dst.index % 10
    cells = (rows // 2) * 3 + cols // 3
    assert sorted(cells.tolist()) == list(range(9)) and rows.max() < 6 and cols.max() < 9
    assert torch.equal(dst.slot[dst.index], torch.arange(9))
    if seed is None:
        assert torch.equal(rows % 2, torch.zeros(9, dtype=torch.long)) and torch.equal(cols % 3, torch.zeros(9, dtype=torch.long))


def test_random_destinations_cover_the_cell():
    grid = Grid(1, 8, 8)
    offsets = torch.stack([
        (lambda d: (d.index // 8 % 2) * 2 + d.index % 8 % 2)(choose_destinations(grid, 2, 2, seed=0, timestep=t))
        for t in range(200)
    ])  # fmt: skip
    counts = torch.bincount(offsets.flatten(), minlength=4).float()
    assert (counts / counts.sum() - 0.25).abs().max() < 0.02  # uniform over the 4 positions of a cell
    assert random_key(0, 981) == random_key(0, torch.tensor(981.0)).item() == random_key(0, torch.tensor(981)).item()


def test_plan_merges_the_most_similar_sources():
    # 4 tokens on a 2x2 grid, one 2x2 cell: destination 0 (top-left), sources 1, 2, 3.
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]]])
    dst = choose_destinations(Grid(1, 2, 2), 2, 2)
    plan = plan_merge(x, dst, num_merged=2, num_agent_merged=3)
    # token 1 is most similar to the destination, then token 3; token 2 stays alone
    assert plan.num_slots == 2 and plan.slot.tolist() == [[0, 0, 1, 0]]
    merged = merge(x, plan)
    torch.testing.assert_close(merged[0, 0], x[0, [0, 1, 3]].mean(0))  # the destination counts in the mean
    torch.testing.assert_close(merged[0, 1], x[0, 2])
    torch.testing.assert_close(unmerge(merged, plan)[0], merged[0, [0, 0, 1, 0]])
    assert plan.agent_slot.tolist() == [[0, 0, 0, 0]]
    torch.testing.assert_close(merge_with_agents(x, plan)[1][0, 0], x[0].mean(0))


def test_merge_then_unmerge_keeps_slot_means():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6 * 9, 8, generator=g)
    dst = choose_destinations(Grid(1, 6, 9), 2, 2, seed=3, timestep=500)
    plan = plan_merge(x, dst, num_merged=20)
    assert plan.slot.min() >= 0 and plan.slot.max() == plan.num_slots - 1
    for b in range(2):
        assert len(plan.slot[b].unique()) == plan.num_slots  # every slot is used
    merged = merge(x, plan)
    assert merged.shape == (2, 6 * 9 - 20, 8)
    # merging the unmerged result again changes nothing: each slot holds the mean of its tokens
    torch.testing.assert_close(merge(unmerge(merged, plan), plan), merged)
