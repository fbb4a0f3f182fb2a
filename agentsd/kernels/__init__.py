"""Triton kernels of the merge plan, the merge and the unmerge, used on CUDA; merge.py's torch code
is their reference.

Per block and call, three phases, each a module (a block at 512px in eager mode is bound by the
host, so each phase is as few launches as its data flow allows):
- plan (steps 1-4, planning.py), all of it in one workspace (layout.py):
  - prologue: the destination pattern, the destinations' unit rows, the merge's sums zeroed;
  - matching (matching.py, matching_kernels.py): every source's best destination, without writing
    the similarity matrix;
  - selection (selection.py): which sources merge (the t best scores), without a sort;
- merge (merging.py): the merged sequence and the agents in one pass over x, deterministic;
- unmerge (unmerging.py): every token the row of its slot, plus the block's residual where
  lean_forward asks.

Kernels launch through Triton's public API (`kernel[grid](...)`) on the device of their tensors
(launch.py). Under torch.compile each phase runs as a custom op (ops.py).
"""

import os

import torch

from . import ops
from .launch import INTERPRET, triton
from .layout import Plan, PlanShape
from .matching import tuning_seconds

__all__ = ["ENABLED", "INTERPRET", "Plan", "PlanShape", "available", "merge", "plan", "triton", "tuning_seconds", "unmerge"]

ENABLED = os.environ.get("AGENTSD_KERNELS", "1") != "0"  # AGENTSD_KERNELS=0 runs the torch code on CUDA too


def available(x) -> bool:
    """Whether the kernels run for a tensor or device: on CUDA, in eager calls, CUDA graphs and
    torch.compile (there as custom ops, see ops.py)."""
    device = x.device if torch.is_tensor(x) else torch.device(x)
    return triton is not None and ENABLED and device.type == "cuda"


def plan(x, width: int, sy: int, sx: int, downsample: int, num_merged: int, num_agent_merged: int | None,
         key: int | None = None, seed: int = 0, timestep: torch.Tensor | None = None) -> Plan:  # fmt: skip
    """Steps 1-4 for a block whose metric is x (B, N, C) on a grid `width` tokens wide (see
    merge.plan_block): destinations random from an int `key`, or from the key of (seed, timestep)
    with a timestep tensor, else top-left."""
    (workspace,) = ops.plan(x, width, sy, sx, downsample, key, seed, timestep, num_merged, num_agent_merged)
    return Plan(workspace, PlanShape(*x.shape, x.dtype, width, sy, sx, num_merged, num_agent_merged))


def merge(x: torch.Tensor, plan: Plan, with_agents: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (B, N, C) -> the merged sequence (B, N - t, C) and, with_agents, the agents (B, N - t_a, C)."""
    return ops.merge(x, plan.workspace, *plan.shape[1:], with_agents)


def unmerge(y: torch.Tensor, plan: Plan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, N - t, C') -> (B, N, C'): every token the row of its slot, plus `residual` (B, N, C') if given."""
    return ops.unmerge(y, plan.workspace, residual, *plan.shape[1:])[0]
