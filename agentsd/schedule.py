"""Which stage of the schedule a UNet call uses.

The stage is a fraction of the denoising trajectory: the position of the call's timestep in the
scheduler's full `timesteps` list over the list's length. Every diffusers pipeline hands each
step's timestep to `scheduler.scale_model_input(sample, t)` just before the UNet call, and that
`t` is an element of `scheduler.timesteps` (the pipelines loop `for t in timesteps`, a slice of
it for img2img). So the tracker wraps `scale_model_input` and reads the element's index from the
tensor's storage offset: no device sync, nothing inside the UNet, and right for any scheduler
(Heun's doubled entries and PNDM's extra one included), any number of steps, img2img `strength`
(a run that starts halfway starts at fraction 0.5) and any number of pipeline calls.

The UNet only reads `tracker.stage`, so torch.compile specialises once per stage.
"""

import warnings

import torch

from .config import Stage


def stage_at(stages: tuple[Stage, ...], fraction: float) -> Stage:
    """The first stage that ends after `fraction`."""
    for stage in stages:
        if fraction < stage.end:
            return stage
    return stages[-1]


def timestep_index(timestep, timesteps) -> int | None:
    """Index of `timestep` in `timesteps` when it is one of its elements, from tensor metadata only."""
    if not (torch.is_tensor(timestep) and torch.is_tensor(timesteps)):
        return None
    if timestep.dim() != 0 or timesteps.dim() != 1 or len(timesteps) == 0:
        return None
    if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
        return None
    index, remainder = divmod(timestep.storage_offset() - timesteps.storage_offset(), timesteps.stride(0))
    return index if remainder == 0 and 0 <= index < len(timesteps) else None


class StageTracker:
    """Follows the schedulers that drive the UNet and keeps `stage` up to date."""

    def __init__(self, stages: tuple[Stage, ...]):
        self.stages = stages
        self.stage = stages[0]
        self._followed = []  # schedulers whose scale_model_input we wrapped
        # Fallback when a timestep is not an element of scheduler.timesteps: count calls.
        self._counted_timesteps = None
        self._count = 0

    def follow(self, scheduler) -> None:
        """Wrap `scheduler.scale_model_input` (once) so that each step updates the stage."""
        if any(s is scheduler for s in self._followed):
            return
        original = scheduler.scale_model_input

        def scale_model_input(sample, timestep=None, *args, **kwargs):
            self.update(scheduler, timestep)
            return original(sample, timestep, *args, **kwargs)

        scale_model_input.__wrapped__ = original
        scheduler.scale_model_input = scale_model_input
        self._followed.append(scheduler)

    def unfollow(self) -> None:
        for scheduler in self._followed:
            scheduler.__dict__.pop("scale_model_input", None)
        self._followed.clear()

    def update(self, scheduler, timestep) -> None:
        timesteps = getattr(scheduler, "timesteps", None)
        index = timestep_index(timestep, timesteps)
        if index is None:
            index = self._count_call(scheduler, timesteps)
        total = len(timesteps) if timesteps is not None and len(timesteps) else 1
        self.stage = stage_at(self.stages, index / total)

    def _count_call(self, scheduler, timesteps) -> int:
        if timesteps is not self._counted_timesteps:
            warnings.warn(
                "agentsd: the timestep given to scheduler.scale_model_input is not an element of "
                "scheduler.timesteps, so the schedule counts calls from scheduler.begin_index instead.",
                stacklevel=3,
            )
            self._counted_timesteps = timesteps
            self._count = getattr(scheduler, "begin_index", None) or 0
        self._count += 1
        return self._count - 1
