"""Which stage of the schedule a UNet call uses.

The stage is a fraction of the denoising trajectory: the position of the call's timestep in the
list of timesteps it was taken from. Every diffusers pipeline loops `for t in timesteps` over
`scheduler.timesteps` (a slice of it for img2img, which starts late) and hands `t` to the UNet, so `t`
is a view into that list: its storage offset is its index and its storage the whole list. That is
tensor metadata: no device sync, no wrapper on the scheduler or the pipeline, and right for any
scheduler (Heun's doubled entries and PNDM's extra one included), any number of steps, img2img
`strength`, one-step runs, several pipelines sharing one UNet and threads. A timestep of its own (a
number, or a tensor that is no such view) is looked up by value in the `scheduler` given to
apply_patch, or else placed on the 1000 training timesteps of Stable Diffusion, with a warning.

Eager calls read the stage, and so do blocks that torch.compile traces: it makes a graph per stage.
With ONE_GRAPH_FOR_STAGES, a traced block that merges only for its self-attention takes every stage
at once (StagedPlan), so that one graph serves them all.
"""

import warnings
from typing import NamedTuple

import torch

from .config import Stage
from .merge import Grid

TRAIN_TIMESTEPS = 1000  # num_train_timesteps of every SD 1.x/2.x/SDXL scheduler config


# True: one graph for every stage. In torch.compile's default mode it compiles in the unpatched UNet's
# time (SD 1.5 1024, H100, torch 2.11: 51 s against 61 s; a graph per stage 95-97 s) and runs as fast
# (1.21x against 1.22x). Not the default, because inductor turns CUDA graphs off for any graph holding a
# torch.cond on GPU tensors (torch 2.11-2.13, lowering of cond): reduce-overhead and max-autotune then
# run without them (0.87x the compiled baseline against 1.32x with a graph per stage). Regional compiling
# gains nothing from it: a graph per stage compiles there in the baseline's time. docs/performance.md,
# "One graph: no CUDA graphs".
ONE_GRAPH_FOR_STAGES = False


def keep_cond_graphs_in_caches() -> None:
    """Where ONE_GRAPH_FOR_STAGES: let inductor's FX graph and AOTAutograd caches keep graphs that hold
    a torch.cond, through the config torch offers for ops it has not marked cacheable
    (a key of its own: torch's version). The caches' key holds both branches: on the CPU a second
    process hit both caches for the same schedule, and a change in either branch alone missed
    (docs/results/2026-12-07-cpu/cond_cache.log)."""
    cond = torch.ops.higher_order.cond
    if cond.cacheable():
        return
    from torch._inductor import config

    name = f"{cond.__module__}.{cond.__name__}"
    if config.unsafe_marked_cacheable_functions.get(name) != torch.__version__:  # once, not at every UNet call
        config.unsafe_marked_cacheable_functions = {**config.unsafe_marked_cacheable_functions, name: torch.__version__}


class StagedPlan(NamedTuple):
    """In a call that torch.compile traces, the merge plan of a block that merges only for attn1, in
    every stage at once: its input and grid. Its user computes the self-attention as a torch.cond over
    the stages (UNetPatch.over_stages): reading the stage instead would make a whole-UNet graph per
    stage, and compiling the paper's schedule would take about twice the unpatched UNet's time."""

    x: torch.Tensor  # contiguous; the block goes on with it
    grid: Grid

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]


def stage_at(stages: tuple[Stage, ...], fraction: float) -> Stage:
    """The first stage that ends after `fraction`."""
    for stage in stages:
        if fraction < stage.end:
            return stage
    return stages[-1]


def list_position(timestep) -> tuple[int, int] | None:
    """(index, length) of `timestep` in the 1-D list whose element it is (all its entries one element
    of that list, as `t.expand(n)` gives), from tensor metadata only; None for a timestep of its own."""
    if not torch.is_tensor(timestep) or timestep.numel() == 0:
        return None
    if any(stride != 0 for size, stride in zip(timestep.shape, timestep.stride()) if size > 1):
        return None  # several timesteps
    length = timestep.untyped_storage().nbytes() // timestep.element_size()
    # A one-step run's (SD-Turbo's) one-element list: its element is a view of a 1-D tensor, where a
    # timestep of its own (torch.tensor(t), even expanded) owns its storage or views a 0-D one.
    base = timestep._base
    if length > 1 or (base is not None and base.dim() == 1):
        return timestep.storage_offset(), length
    return None


def trajectory_fraction(timestep, scheduler=None) -> float:
    """Where in [0, 1) of the denoising trajectory a UNet call at `timestep` lies."""
    position = list_position(timestep)
    if position is not None:
        index, length = position
        return index / length
    if torch.is_tensor(timestep):
        values = timestep.reshape(-1).cpu()  # one device sync, as reading the value needs
        value = float(values[0])
        if (values != value).any():
            warnings.warn(
                "agentsd: the UNet got different timesteps in one call (one per image, as ParaDiGMS does): the "
                "whole call runs in the stage of the first; give apply_patch one stage (sx, sy, agent_ratio) there.",
                stacklevel=2,
            )
    else:
        value = float(timestep)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is not None and len(timesteps):
        timesteps = torch.as_tensor(timesteps).cpu()
        return int((timesteps - value).abs().argmin()) / len(timesteps)
    warnings.warn(
        "agentsd: the UNet got a timestep of its own (a number, or a tensor that is no element of a list of "
        "timesteps, as a custom loop may pass), and apply_patch got no scheduler= to look it up in: its stage "
        "is placed by its value on the 1000 training timesteps.",
        stacklevel=2,
    )
    return min(max(1 - value / TRAIN_TIMESTEPS, 0.0), 1.0)
