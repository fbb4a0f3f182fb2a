"""Step 2 of a plan on the host: which matching kernel runs, with which autotuned config, and its
launch (the kernels are in matching_kernels.py).

A matching kernel's config is chosen once per (kernel, N, D, C, dtype): by Triton's autotuner on
its first launch, kept on disk for later processes (tuned_configs), then launched with that config
straight through its jit function."""

import time

import torch

from .. import tuned_configs
from .launch import INTERPRET, TOKEN_BLOCK, cdiv, next_power_of_2, triton
from .layout import Layout, PlanShape

if triton is not None:
    from .matching_kernels import _best_destination_kernel, _best_destination_resident_kernel, _combine_splits_kernel


def match(x, parts: dict, shape: PlanShape, layout: Layout) -> bool:
    """score and best of every source (step 2): its cosine similarity to its best destination.
    Whether the matching's last programs also selected the slots."""
    batch, n_tokens, channels = x.shape
    num_dst, dst_unit = shape.num_dst, parts["dst_unit"]
    dst_strides = (dst_unit.stride(0), dst_unit.stride(1))
    flags = dict(SY=shape.sy, SX=shape.sx, IEEE=x.dtype == torch.float32)
    if layout.resident is not None:  # SD 1.x block inputs come channels-last (stride(-1) = N): read them in place
        c_a, c_b, c_rest = layout.resident
        grid = lambda meta: (cdiv(n_tokens - num_dst, meta["BLOCK_M"]), batch)  # noqa: E731
        has_agents = shape.num_agent_merged is not None
        args = (x, dst_unit, parts["dst_index"], parts["score"], parts["best"], parts["token_cell"], parts["slot"],
                parts.get("agent_slot", parts["slot"]), parts["counters"], n_tokens, num_dst, shape.width,
                shape.num_merged, shape.num_agent_merged or 0)  # fmt: skip
        args += (*x.stride(), *dst_strides)
        meta = dict(**flags, C_A=c_a, C_B=c_b, C_REST=c_rest, HAS_AGENTS=has_agents, SELECT_BLOCK=next_power_of_2(n_tokens))
        config = _matching_config(_best_destination_resident_kernel, grid, x, num_dst, *args, **meta, SELECT=False)
        # The selection's sequential steps want 8 warps or more (its own kernel's): with 4 a
        # ToMe-stage plan at 512px took 70 us of GPU time against 53 us in two launches (H100). The
        # interpreter selects there whatever the warps, so that the CPU tests run it.
        select = layout.can_select_in_matching and (INTERPRET or config.num_warps >= 8)
        _launch_matching(_best_destination_resident_kernel, grid, x, num_dst, *args, **meta, SELECT=select, config=config)
        return select
    splits = layout.splits
    score, best = (parts["part_score"], parts["part_best"]) if splits > 1 else (parts["score"], parts["best"])
    grid = lambda meta: (cdiv(n_tokens - num_dst, meta["BLOCK_M"]), batch, splits)  # noqa: E731
    args = (x, dst_unit, parts["dst_index"], score, best, n_tokens, num_dst)
    _launch_matching(_best_destination_kernel, grid, x, num_dst, *args, channels, shape.width, *x.stride()[:2],
                     *dst_strides, layout.d_per_split, **flags, BLOCK_C=min(64, max(16, next_power_of_2(channels))))  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(cdiv(n_tokens - num_dst, TOKEN_BLOCK), batch)](
            score, best, parts["dst_index"], parts["score"], parts["best"], n_tokens, num_dst, shape.width, splits,
            SY=shape.sy, SX=shape.sx, BLOCK=TOKEN_BLOCK,
        )  # fmt: skip
    return False


_matching_configs_found = {}  # (kernel, N, D, C, dtype): the config its autotuner chose
_tuning = {"seconds": 0.0}  # spent in the autotuner by this process (its candidates compiled and timed)


def tuning_seconds() -> float:
    """Seconds this process spent autotuning matching kernels (the benchmark tells them apart from
    compiling: both make a first image slow)."""
    return _tuning["seconds"]


def _matching_config(tuned, grid, x, num_dst: int, *args, **meta):
    """The config of a matching kernel for this key: chosen in this process, or stored on disk by an
    earlier one (tuned_configs), or else by the autotuner (which launches the kernel with `args` and
    `meta`), then stored."""
    key = (tuned, x.shape[1], num_dst, x.shape[2], x.dtype)
    config = _matching_configs_found.get(key)
    if config is None:
        name, disk_key = tuned.fn.fn.__name__, (*key[1:4], str(x.dtype).removeprefix("torch."))
        stored = tuned_configs.load(x.device, name, disk_key)
        config = next((c for c in tuned.configs if c.all_kwargs() == stored), None)
        if config is None:
            start = time.perf_counter()
            config = _autotune(tuned, grid, args, meta)  # times every candidate, synchronizing
            _tuning["seconds"] += time.perf_counter() - start
            tuned_configs.store(x.device, name, disk_key, config.all_kwargs())
        _matching_configs_found[key] = config
    return config


def _autotune(tuned, grid, args, meta):
    """Run Triton's autotuner of `tuned` once on these arguments and return the config it chose."""
    tuned[grid](*args, **meta)
    return tuned.best_config


def _launch_matching(tuned, grid, x, num_dst: int, *args, config=None, **meta):
    """Launch a matching kernel (autotune over heuristics over jit) as its jit function with its config
    (by default _matching_config's): the autotuner's and the heuristic's Python cost an eager block
    at 512px (bound by the host) about 80 us under cProfile on an H100 host."""
    config = config or _matching_config(tuned, grid, x, num_dst, *args, **meta)
    even_d = num_dst % config.kwargs["BLOCK_D"] == 0
    tuned.fn.fn[grid(config.kwargs)](*args, **meta, **config.all_kwargs(), EVEN_D=even_d)
