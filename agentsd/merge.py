"""Token merging for AgentSD: pure torch, nothing of diffusers (steps 1-4 and 6 of ALGORITHM.md).

A merge plan gives every token of a block its slot in the merged sequence, so that

    merge:   (B, N, C)     -> (B, N - t, C)   each slot is the mean of the tokens that map to it
    unmerge: (B, N - t, C) -> (B, N, C)       each token takes the value of its slot

Destinations keep their own slot and absorb the sources merged into them; unmerged sources keep
a slot of their own. The agents are a second plan from the same matching with more merged.
Token order inside the merged sequence is free (attention has no positions): destinations come
first, then the unmerged sources in token order.
"""

import math
import struct
from typing import NamedTuple

import torch

from . import kernels

_MASK32 = 0xFFFFFFFF


class Grid(NamedTuple):
    """Where a block sits in the UNet: its downsampling factor and token grid."""

    downsample: int
    height: int
    width: int


class Destinations(NamedTuple):
    """One destination per complete sy x sx cell of a grid of N tokens, D cells."""

    index: torch.Tensor  # (D,) int64: token position of each cell's destination
    slot: torch.Tensor  # (N,) int64: at a destination's position, its cell; 0 elsewhere
    is_dst: torch.Tensor  # (N,) bool
    width: int  # of the grid, in tokens
    cell: tuple[int, int]  # (sy, sx)


class MergePlan(NamedTuple):
    """Steps 2-4 for one block: the slot of every token, in the merged sequence and among the agents."""

    slot: torch.Tensor  # (B, N) int64
    num_merged: int  # t: the merged sequence has N - t slots
    agent_slot: torch.Tensor | None  # (B, N) int64; None: no agents
    num_agent_merged: int | None  # t_a: n = N - t_a agents
    destinations: Destinations

    @property
    def num_tokens(self) -> int:
        return self.slot.shape[1]

    @property
    def num_slots(self) -> int:
        return self.slot.shape[1] - self.num_merged


def token_grid(latent_size: tuple[int, int], num_tokens: int) -> Grid:
    """The level of a block that sees `num_tokens` tokens when the UNet input is `latent_size`."""
    latent_h, latent_w = latent_size
    # ceil(sqrt(h w / N)) as ToMe computes it, in integers: the smallest d with d^2 N >= h w. Under
    # torch.compile's dynamic shapes each comparison is a guard and d a constant, where a square root
    # of symbolic sizes gives expressions that sympy takes minutes to simplify.
    downsample = 1
    while downsample * downsample * num_tokens < latent_h * latent_w:
        downsample += 1
    return Grid(downsample, -(-latent_h // downsample), -(-latent_w // downsample))


def merge_counts(num_tokens: int, num_dst: int, ratio: float, agent_ratio: float) -> tuple[int, int | None]:
    """(t, t_a): tokens merged away for the merged sequence and for the agents.

    t = 0 means the block runs unpatched. t_a is None when agents would not pay (2n >= N - t):
    then the block is plain ToMe attention on the merged sequence.
    """
    requested = int(num_tokens * ratio)  # the official code floors with int(), so do we
    num_src = num_tokens - num_dst
    num_merged = min(requested, num_src)
    if num_merged <= 0 or num_dst == 0:
        return 0, None
    num_agent_merged = min(int(num_tokens * agent_ratio), num_src)
    if 2 * (num_tokens - num_agent_merged) < num_tokens - num_merged:
        return num_merged, num_agent_merged
    return num_merged, None


def _mix32(x):
    """Thomas Mueller's 32-bit integer hash (multiplier 0x45d9f3b), on ints or int64 tensors.

    Inputs lie in [0, 2**32) and the multiplier is below 2**27, so int64 never overflows.
    """
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def random_key(seed: int, timestep) -> torch.Tensor | int:
    """A 32-bit key for one UNet call, from the seed and the timestep, without reading the timestep.

    Calls at different timesteps get independent destination patterns and a run is
    reproducible from its seed. The key stays on the timestep's device (no host sync, fine
    inside CUDA graphs and torch.compile).
    """
    if torch.is_tensor(timestep):
        bits = timestep.reshape(-1)[0].to(torch.float32).view(torch.int32).to(torch.int64) & _MASK32
    else:
        bits = struct.unpack("<I", struct.pack("<f", float(timestep)))[0]
    return _mix32(bits ^ (seed & _MASK32))


def choose_destinations(grid: Grid, sy: int, sx: int, seed: int | None = None, timestep=0, device=None) -> Destinations:
    """Step 1: one destination per complete sy x sx cell: top-left without a seed, else random,
    drawn from the key random_key(seed, timestep) of the call."""
    cells_y, cells_x = grid.height // sy, grid.width // sx
    num_tokens = grid.height * grid.width
    cell = torch.arange(cells_y * cells_x, device=device)
    key = None if seed is None else random_key(seed, timestep)
    if key is None:
        offset = torch.zeros_like(cell)
    else:
        # Distinct hash inputs per (level, cell); levels are powers of two below 16.
        offset = _mix32((_mix32(cell * 16 + grid.downsample) + key) & _MASK32) % (sy * sx)
    row = torch.div(cell, cells_x, rounding_mode="floor") * sy + torch.div(offset, sx, rounding_mode="floor")
    col = (cell % cells_x) * sx + offset % sx
    index = row * grid.width + col
    slot = torch.zeros(num_tokens, dtype=torch.int64, device=device).scatter_(0, index, cell)
    is_dst = torch.zeros(num_tokens, dtype=torch.bool, device=device).scatter_(0, index, True)
    return Destinations(index, slot, is_dst, grid.width, (sy, sx))


def plan_block(
    metric: torch.Tensor, grid: Grid, sy: int, sx: int, num_merged: int, num_agent_merged: int | None = None,
    seed: int | None = None, timestep=0,
) -> "MergePlan | kernels.Plan":
    """Steps 1-4 for a block whose metric (B, N, C) lies on `grid`: its destinations, then
    plan_merge. On CUDA the kernels do it all and keep the plan in one workspace (kernels.Plan)."""
    if kernels.available(metric):
        if seed is not None and torch.is_tensor(timestep):  # the key is drawn on the GPU
            where = dict(seed=seed, timestep=timestep)
        else:
            where = dict(key=None if seed is None else random_key(seed, timestep))
        return kernels.plan(metric, grid.width, sy, sx, grid.downsample, num_merged, num_agent_merged, **where)
    destinations = choose_destinations(grid, sy, sx, seed, timestep, metric.device)
    return plan_merge(metric, destinations, num_merged, num_agent_merged)


def plan_merge(
    metric: torch.Tensor, destinations: Destinations, num_merged: int, num_agent_merged: int | None = None
) -> MergePlan:
    """Steps 2-4: match every source to its most similar destination and pick the most similar sources.

    metric (B, N, C): the block input X. The `num_merged` sources of best cosine similarity merge
    into their destination (ties go to the lower token index); `num_agent_merged` for the agents.
    """
    score, best_dst = best_destination(metric, destinations)
    slot, agent_slot = assign_slots(score, best_dst, destinations, num_merged, num_agent_merged)
    return MergePlan(slot, num_merged, agent_slot, num_agent_merged, destinations)


def best_destination(metric: torch.Tensor, destinations: Destinations) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) -> cosine similarity to the most similar destination and its index, both (B, N).

    Destinations score -inf, so that they rank after every source and are never merged.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    score, best_dst = (metric @ metric[:, destinations.index].transpose(1, 2)).max(dim=-1)  # (B, N, D) -> (B, N)
    return score.masked_fill(destinations.is_dst, -math.inf), best_dst


def assign_slots(
    score: torch.Tensor, best_dst: torch.Tensor, destinations: Destinations, num_merged: int, num_agent_merged: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slot of every token (B, N), for the merged sequence and for the agents (or None).

    Tokens are ranked by descending score, ties by token index. The sources of rank r < t join their
    best destination's slot; the other sources take slots D, D + 1, ... in token order (the order
    of the merged sequence is free); destinations keep their cell's slot.
    """
    num_dst = destinations.index.numel()
    order = score.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    source = ~destinations.is_dst

    def slots(merged: int) -> torch.Tensor:
        unmerged = source & (rank >= merged)
        unmerged_before = unmerged.cumsum(dim=-1) - unmerged.long()
        source_slot = torch.where(rank < merged, best_dst, num_dst + unmerged_before)
        return torch.where(source, source_slot, destinations.slot)

    return slots(num_merged), None if num_agent_merged is None else slots(num_agent_merged)


def merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """(B, N, C) -> (B, N - t, C): the mean of the tokens of each slot."""
    if isinstance(plan, kernels.Plan):
        return kernels.merge(x, plan, with_agents=False)[0]
    return _scatter_mean(x, plan.slot, plan.num_slots)


def merge_with_agents(x: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, C) -> the merged sequence (B, N - t, C) and the agents (B, n, C), in one pass on CUDA."""
    if isinstance(plan, kernels.Plan):
        return kernels.merge(x, plan, with_agents=True)
    num_agents = x.shape[1] - plan.num_agent_merged
    return _scatter_mean(x, plan.slot, plan.num_slots), _scatter_mean(x, plan.agent_slot, num_agents)


def _scatter_mean(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    out = x.new_zeros(x.shape[0], num_slots, x.shape[-1])
    return out.scatter_reduce_(1, slot.unsqueeze(-1).expand_as(x), x, reduce="mean", include_self=False)


def unmerge(x: torch.Tensor, plan: MergePlan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N - t, C) -> (B, N, C): every token takes the value of its slot (plus `residual`, (B, N, C),
    in one pass on CUDA)."""
    if isinstance(plan, kernels.Plan):
        return kernels.unmerge(x, plan, residual)
    out = x.gather(1, plan.slot.unsqueeze(-1).expand(*plan.slot.shape, x.shape[-1]))
    return out if residual is None else out + residual
