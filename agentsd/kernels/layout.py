"""A plan as the kernels keep it: what it is made for (PlanShape), its one workspace (Plan), and
where its parts lie in that workspace and how its matching and selection run (Layout)."""

import functools
import math
from typing import NamedTuple

import torch

from .launch import INTERPRET, TOKEN_BLOCK, cdiv
from .matching_kernels import SPLIT_ALIGN


class PlanShape(NamedTuple):
    """What a block's plan is made for: the metric (B, N, C) on a grid `width` tokens wide, one
    destination per sy x sx cell, t (and t_a for the agents) merged."""

    batch: int
    num_tokens: int
    channels: int
    dtype: torch.dtype  # of the metric
    width: int
    sy: int
    sx: int
    num_merged: int
    num_agent_merged: int | None

    @property
    def num_dst(self) -> int:
        return (self.num_tokens // self.width // self.sy) * (self.width // self.sx)


class Plan(NamedTuple):
    """A block's merge plan as the kernels keep it: all its parts in one workspace (layout_for), so
    that a plan costs one allocation."""

    workspace: torch.Tensor  # uint8
    shape: PlanShape

    @property
    def num_tokens(self) -> int:
        return self.shape.num_tokens

    @property
    def num_merged(self) -> int:
        return self.shape.num_merged

    @property
    def num_agent_merged(self) -> int | None:
        return self.shape.num_agent_merged

    @property
    def num_slots(self) -> int:
        return self.shape.num_tokens - self.shape.num_merged

    def parts(self) -> dict[str, torch.Tensor]:
        """The parts as tensors, by name (token_cell: a destination's cell or -1; dst_index, score,
        best, slot, agent_slot, dst_unit, sums, ...)."""
        return views(self.workspace, layout_for(self.shape, self.workspace.device))


class Layout(NamedTuple):
    """Where the parts of a plan lie in its workspace, and how the matching and selection run."""

    parts: dict  # name -> (byte offset, dtype, shape)
    size: int  # bytes
    resident: tuple[int, int, int] | None  # _resident_split: the resident matching kernel, else the looped one
    splits: int  # the looped matching's destination splits
    d_per_split: int
    radix_programs: int  # 0: the one-program selection

    @property
    def can_select_in_matching(self) -> bool:
        """Whether the one-program selection may run in the resident matching's last programs."""
        return self.resident is not None and not self.radix_programs


# Up to this many tokens (SD 512px, SDXL 1024px) one program per batch row selects and assigns the
# slots: one launch instead of the radix selection's five, and less GPU time too (H100, batch 2,
# 4096 tokens, whole plans: 41.6 / 44.8 us against 54.4 / 54.5 us, agent / ToMe stage). At 9216 tokens
# its plans take 1.8x / 2.3x the radix selection's (docs/results/2026-11-24-h100/kernel_benchmark_fc7256c.txt).
ONE_PROGRAM_MAX_TOKENS = 4096
_HISTOGRAM = 5 * 2048 + 3  # int32 per batch row for the radix passes: B x 5 x 2048 histograms, then B x 3 done counters


@functools.cache
def layout_for(shape: PlanShape, device: torch.device) -> Layout:
    """The layout of the plans of this shape on this device (parts 128-byte aligned)."""
    return plan_layout(shape, device)


def plan_layout(shape: PlanShape, device: torch.device) -> Layout:
    """layout_for, uncached: its sizes may be symbols (torch.compile's dynamic shapes, in ops.py's fake)."""
    batch, n_tokens, num_dst, channels = shape.batch, shape.num_tokens, shape.num_dst, shape.channels
    has_agents = shape.num_agent_merged is not None
    parts = {
        "token_cell": (torch.int32, (n_tokens,)),
        "dst_index": (torch.int32, (num_dst,)),
        "score": (torch.float32, (batch, n_tokens)),
        "best": (torch.int32, (batch, n_tokens)),
        "slot": (torch.int32, (batch, n_tokens)),
        "dst_unit": (shape.dtype, (batch, num_dst, channels)),
        "sums": (torch.int64, (batch, num_dst, (channels + 1) * (1 + has_agents))),
    }
    if has_agents:
        parts["agent_slot"] = (torch.int32, (batch, n_tokens))
    resident = _resident_split(channels, shape.dtype, device)
    splits, d_per_split = 1, num_dst
    if resident is None:
        d_per_split = cdiv(cdiv(num_dst, _destination_splits(batch, n_tokens, num_dst, device)), SPLIT_ALIGN) * SPLIT_ALIGN
        splits = cdiv(num_dst, d_per_split)
    if splits > 1:  # each split writes its part; one more launch combines them
        parts["part_score"] = (torch.float32, (splits, batch, n_tokens))
        parts["part_best"] = (torch.int32, (splits, batch, n_tokens))
    radix_programs = 0 if n_tokens <= min(ONE_PROGRAM_MAX_TOKENS, 2**15 - 1) else cdiv(n_tokens, TOKEN_BLOCK)
    # zeroed by the prologue: the radix passes' histograms and done counters, or per batch row the
    # matching's count of finished programs
    parts["counters"] = (torch.int32, (batch, _HISTOGRAM if radix_programs else 1))
    if radix_programs:
        parts["threshold"] = (torch.int64, (batch, 2, 2))
        parts["below"] = (torch.int32, (batch, 2, radix_programs, 2))
    placed, size = {}, 0
    for name, (dtype, part_shape) in parts.items():
        placed[name] = (size, dtype, part_shape)
        size += cdiv(math.prod(part_shape) * dtype.itemsize, 128) * 128
    return Layout(placed, size, resident, splits, d_per_split, radix_programs)


def views(workspace: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The parts of a plan's workspace as tensors, by name."""
    return {
        name: workspace[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (offset, dtype, shape) in layout.parts.items()
    }


def _resident_split(channels: int, dtype: torch.dtype, device) -> tuple[int, int, int] | None:
    """(C_A, C_B, C_REST) for the resident kernel: powers of two up to 128 (C_B and C_REST may be 0)
    that sum to the channels, when a program's rows fit in registers and its smallest candidate's
    destination tiles in shared memory; else None."""
    # 16 rows per warp in every candidate: a thread holds C/4 registers of fp16 rows (80 at 320)
    if dtype.itemsize * channels > 768:
        return None
    main = 1 << (channels.bit_length() - 1)
    rest = channels - main
    if main < 16 or (rest and (rest < 16 or rest & (rest - 1))):
        return None  # tl.dot wants tiles of at least 16
    # two stages of 64 destinations: 80 KB at 320 channels in fp16 (H100 227 KB, consumer GPUs ~100)
    if not INTERPRET and dtype.itemsize * channels * 2 * 64 > _shared_memory(device):
        return None
    first = min(main, 128)  # an identity of 128 x 128 (_rows) takes 32 KB
    return first, main - first, rest


@functools.cache
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _destination_splits(batch: int, n_tokens: int, num_dst: int, device) -> int:
    """Into how many parts the looped matching splits the destinations: with few rows the GPU is not
    filled (SDXL 1024px, level 2: 48 programs of 128 rows on an H100's 132 SMs)."""
    if INTERPRET:
        return 1
    programs = cdiv(n_tokens - num_dst, 128) * batch
    return max(1, min(cdiv(_multiprocessors(device), programs), num_dst // SPLIT_ALIGN))
