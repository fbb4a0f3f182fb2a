"""Triton kernels of the merge plan and the merge, used on CUDA; merge.py's torch code is their reference.

Per block and call, the plan is three or four launches and the merge three:
- best_destination: the destinations gathered and normalised (one launch), then the cosine
  similarity of every token to every destination, reduced to the best one as it goes: the
  (B, N, D) similarity matrix is never written (1 GB per block at 2048px);
- assign_slots: the slots of both plans from the rank of every token's score: after a sort, or
  in eager calls at few tokens (host-bound) by counting pairwise comparisons in one launch;
- merge_mean: the merged sequence and the agents in one pass over x. Unmerged tokens are copied;
  merged sources are summed into their destination with atomics on 64-bit fixed point: integer
  addition does not depend on the order of the atomics, so results are deterministic (float atomics
  are not). The agents reuse the sums of the first plan (its merged sources are theirs too).
- destinations: a block's destination pattern, from the call's timestep tensor, in one launch.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: merge.py runs its torch code
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the tests call kernels directly
ENABLED = os.environ.get("AGENTSD_KERNELS", "1") != "0"  # AGENTSD_KERNELS=0 runs the torch code on CUDA too


def available(x) -> bool:
    """Whether the kernels run for a tensor or device: on CUDA, eager and in CUDA graphs.

    Under torch.compile the torch code runs (inductor compiles it): torch.compile with these kernels
    inside has not been checked on a GPU yet, the torch code has (on the CPU, in the tests).
    """
    device = x.device if torch.is_tensor(x) else torch.device(x)
    return triton is not None and ENABLED and device.type == "cuda" and not torch.compiler.is_compiling()


if triton is not None:

    @triton.jit
    def _mix32(x):  # merge._mix32 on int64, the same constants
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        return (x >> 16) ^ x

    @triton.jit
    def _destinations_kernel(
        timestep_ptr, seed, key_value, index_ptr, slot_ptr, is_dst_ptr,
        height, width, cells_x, num_cells, downsample,
        SY: tl.constexpr, SX: tl.constexpr, KEY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """KEY 0: top-left destinations; 1: the key of merge.random_key(seed, timestep), drawn
        here from the timestep tensor; 2: key_value."""
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if KEY == 1:
            bits = tl.load(timestep_ptr).to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            key = _mix32(bits ^ seed)
        else:
            key = key_value
        # As a cell index: where the cell's destination sits.
        cell = p
        if KEY == 0:
            offset = cell * 0
        else:
            offset = _mix32((_mix32(cell.to(tl.int64) * 16 + downsample) + key) & 0xFFFFFFFF) % (SY * SX)
        dst_row = (cell // cells_x) * SY + offset // SX
        dst_col = (cell % cells_x) * SX + offset % SX
        tl.store(index_ptr + cell, dst_row * width + dst_col, mask=cell < num_cells)
        # As a token position: its cell, and whether it is that cell's destination.
        row, col = p // width, p % width
        in_cells = (row < (height // SY) * SY) & (col < cells_x * SX)
        own_cell = (row // SY) * cells_x + col // SX
        if KEY == 0:
            own_offset = own_cell * 0
        else:
            own_offset = _mix32((_mix32(own_cell.to(tl.int64) * 16 + downsample) + key) & 0xFFFFFFFF) % (SY * SX)
        is_dst = in_cells & ((row % SY) * SX + col % SX == own_offset)
        ok = p < height * width
        tl.store(slot_ptr + p, tl.where(is_dst, own_cell, 0).to(tl.int64), mask=ok)
        tl.store(is_dst_ptr + p, is_dst, mask=ok)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_D": 128}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_D": 256}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_D": 128}, num_warps=4, num_stages=3),
        ]
        if not INTERPRET
        else [triton.Config({"BLOCK_M": 16, "BLOCK_D": 16})],
        key=["N", "D", "C"],
    )
    @triton.jit
    def _best_destination_kernel(
        x_ptr, dst_ptr, is_dst_ptr, score_ptr, best_ptr,
        N, D, C, stride_xb, stride_xn, stride_db, stride_dd,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        x_rows = x_ptr + b * stride_xb + rows[:, None] * stride_xn
        dst_base = dst_ptr + b * stride_db

        squared_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0).to(tl.float32)
            squared_norm += tl.sum(x * x, axis=1)

        best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best = tl.zeros([BLOCK_M], dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            dsts = d0 + tl.arange(0, BLOCK_D)
            dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
                d = tl.load(
                    dst_base + dsts[None, :] * stride_dd + cols[:, None],
                    mask=(dsts[None, :] < D) & (cols[:, None] < C),
                    other=0.0,
                )
                if IEEE:
                    dot = tl.dot(x, d, dot, input_precision="ieee")
                else:
                    dot = tl.dot(x, d, dot)
            dot = tl.where(dsts[None, :] < D, dot, float("-inf"))
            tile_best_dot = tl.max(dot, axis=1)
            tile_best = tl.argmax(dot, axis=1).to(tl.int32) + d0
            better = tile_best_dot > best_dot
            best_dot = tl.where(better, tile_best_dot, best_dot)
            best = tl.where(better, tile_best, best)

        score = best_dot / tl.sqrt(squared_norm)
        is_dst = tl.load(is_dst_ptr + rows, mask=row_ok, other=0)
        score = tl.where(is_dst != 0, float("-inf"), score)
        tl.store(score_ptr + b * N + rows, score, mask=row_ok)
        tl.store(best_ptr + b * N + rows, best.to(tl.int64), mask=row_ok)

    @triton.jit
    def _store_slots(
        token, rank, ok, b, N, D, num_merged, num_agent_merged,
        best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr, HAS_AGENTS: tl.constexpr,
    ):  # fmt: skip
        """Sources of rank < t join their best destination; the others take slot D + rank - t."""
        best = tl.load(best_ptr + b * N + token, mask=ok, other=0)
        is_dst = tl.load(is_dst_ptr + token, mask=ok, other=0) != 0
        own_slot = tl.load(dst_slot_ptr + token, mask=ok, other=0)
        slot = tl.where(is_dst, own_slot, tl.where(rank < num_merged, best, rank + (D - num_merged)))
        tl.store(slot_ptr + b * N + token, slot, mask=ok)
        if HAS_AGENTS:
            agent_slot = tl.where(is_dst, own_slot, tl.where(rank < num_agent_merged, best, rank + (D - num_agent_merged)))
            tl.store(agent_slot_ptr + b * N + token, agent_slot, mask=ok)

    @triton.jit
    def _pairwise_slots_kernel(
        score_ptr, best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr,
        N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    ):  # fmt: skip
        """The rank of each token is how many score higher (ties: lower index first), counted
        against every other token: N**2 comparisons, but one parallel launch and no sort."""
        b = tl.program_id(1)
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        ok = i < N
        score_i = tl.load(score_ptr + b * N + i, mask=ok, other=0.0)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            score_j = tl.load(score_ptr + b * N + j, mask=j < N, other=float("-inf"))
            before = (score_j[None, :] > score_i[:, None]) | ((score_j[None, :] == score_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((before & (j < N)[None, :]).to(tl.int32), axis=1)
        _store_slots(i, rank.to(tl.int64), ok, b, N, D, num_merged, num_agent_merged,
                     best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr, HAS_AGENTS)  # fmt: skip

    @triton.jit
    def _order_slots_kernel(
        order_ptr, best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr,
        N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The same slots from a sort order: the token at rank r of `order` gets rank r."""
        b = tl.program_id(1)
        rank = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rank < N
        token = tl.load(order_ptr + b * N + rank, mask=ok, other=0)
        _store_slots(token, rank.to(tl.int64), ok, b, N, D, num_merged, num_agent_merged,
                     best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr, HAS_AGENTS)  # fmt: skip

    @triton.jit
    def _unit_destinations_kernel(x_ptr, index_ptr, out_ptr, D, C, stride_xb, stride_xn, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
        """out (B, D, C) = the destination rows of x, L2-normalised (in float32, stored in x's dtype)."""
        b = tl.program_id(1)
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = d < D
        rows = x_ptr + b * stride_xb + tl.load(index_ptr + d, mask=ok, other=0) * stride_xn
        squared_norm = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(rows[:, None] + cols[None, :], mask=ok[:, None] & (cols[None, :] < C), other=0.0).to(tl.float32)
            squared_norm += tl.sum(v * v, axis=1)
        inverse = 1.0 / tl.sqrt(squared_norm)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = ok[:, None] & (cols[None, :] < C)
            v = tl.load(rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inverse[:, None]
            tl.store(out_ptr + (b * D + d[:, None]) * C + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_kernel(
        x_ptr, slot_ptr, agent_slot_ptr, is_dst_ptr, merged_ptr, agents_ptr, sums_ptr,
        N, C, D, num_slots, num_agents, stride_xb, stride_xn,
        HAS_AGENTS: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Unmerged sources are copied to their slot; merged sources are added into sums (B, D, W):
        per destination [sum (C), count] of the first plan, then [sum (C), count] of the sources only
        the agents merge."""
        b = tl.program_id(2)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = tokens < N
        col_ok = cols < C
        width = (C + 1) * (1 + HAS_AGENTS)
        source = ok & (tl.load(is_dst_ptr + tokens, mask=ok, other=1) == 0)
        slot = tl.load(slot_ptr + b * N + tokens, mask=ok, other=0)
        x = tl.load(x_ptr + b * stride_xb + tokens[:, None] * stride_xn + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        fixed = (x.to(tl.float32) * SCALE).to(tl.int64)

        joins = source & (slot < D)
        sums = sums_ptr + (b * D + slot) * width
        tl.atomic_add(sums[:, None] + cols[None, :], fixed, mask=joins[:, None] & col_ok[None, :])
        if tl.program_id(1) == 0:
            tl.atomic_add(sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=joins)
        stays = source & (slot >= D)
        tl.store(merged_ptr + (b * num_slots + slot[:, None]) * C + cols[None, :], x, mask=stays[:, None] & col_ok[None, :])
        if HAS_AGENTS:
            agent_slot = tl.load(agent_slot_ptr + b * N + tokens, mask=ok, other=0)
            only_agents = stays & (agent_slot < D)
            agent_sums = sums_ptr + (b * D + agent_slot) * width + C + 1
            tl.atomic_add(agent_sums[:, None] + cols[None, :], fixed, mask=only_agents[:, None] & col_ok[None, :])
            if tl.program_id(1) == 0:
                tl.atomic_add(agent_sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=only_agents)
            alone = stays & (agent_slot >= D)
            tl.store(agents_ptr + (b * num_agents + agent_slot[:, None]) * C + cols[None, :], x, mask=alone[:, None] & col_ok[None, :])

    @triton.jit
    def _destination_mean_kernel(
        x_ptr, index_ptr, sums_ptr, merged_ptr, agents_ptr,
        D, C, num_slots, num_agents, stride_xb, stride_xn,
        HAS_AGENTS: tl.constexpr, SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Each destination slot: (own value + sum of its merged sources) / (1 + their count)."""
        b = tl.program_id(2)
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = d < D
        mask = ok[:, None] & (cols[None, :] < C)
        width = (C + 1) * (1 + HAS_AGENTS)
        token = tl.load(index_ptr + d, mask=ok, other=0)
        own = tl.load(x_ptr + b * stride_xb + token[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
        sums = sums_ptr + (b * D + d) * width
        total = (own.to(tl.float32) * SCALE).to(tl.int64) + tl.load(sums[:, None] + cols[None, :], mask=mask, other=0)
        count = 1 + tl.load(sums + C, mask=ok, other=0)
        mean = total.to(tl.float32) * (1.0 / SCALE) / count[:, None].to(tl.float32)
        tl.store(merged_ptr + (b * num_slots + d[:, None]) * C + cols[None, :], mean.to(merged_ptr.dtype.element_ty), mask=mask)
        if HAS_AGENTS:
            total += tl.load(sums[:, None] + (C + 1) + cols[None, :], mask=mask, other=0)
            count += tl.load(sums + 2 * C + 1, mask=ok, other=0)
            mean = total.to(tl.float32) * (1.0 / SCALE) / count[:, None].to(tl.float32)
            tl.store(agents_ptr + (b * num_agents + d[:, None]) * C + cols[None, :], mean.to(agents_ptr.dtype.element_ty), mask=mask)


def destinations(height: int, width: int, sy: int, sx: int, downsample: int, device, *, key=None, seed=0, timestep=None):
    """(index (D,), slot (N,), is_dst (N,)) as merge.choose_destinations computes them: random from
    an int `key`, or from the key of (seed, timestep) with a timestep tensor; else top-left."""
    cells_x, num_cells = width // sx, (height // sy) * (width // sx)
    num_tokens = height * width
    index = torch.empty(num_cells, dtype=torch.int64, device=device)
    slot = torch.empty(num_tokens, dtype=torch.int64, device=device)
    is_dst = torch.empty(num_tokens, dtype=torch.bool, device=device)
    mode = 2 if key is not None else 1 if timestep is not None else 0
    block = 1024 if not INTERPRET else 64
    _destinations_kernel[(triton.cdiv(num_tokens, block),)](
        timestep if mode == 1 else index, seed & 0xFFFFFFFF, key if mode == 2 else 0, index, slot, is_dst,
        height, width, cells_x, num_cells, downsample, SY=sy, SX=sx, KEY=mode, BLOCK=block,
    )  # fmt: skip
    return index, slot, is_dst


def best_destination(x: torch.Tensor, dst_index: torch.Tensor, is_dst: torch.Tensor):
    """x (B, N, C), destination positions (D,) -> cosine score and index of the best destination,
    (B, N) float32 and int64; the score is -inf at destination tokens."""
    batch, n_tokens, channels = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_dst = dst_index.numel()
    block_c = min(64, max(16, triton.next_power_of_2(channels)))
    dst_unit = torch.empty(batch, num_dst, channels, device=x.device, dtype=x.dtype)
    _unit_destinations_kernel[(triton.cdiv(num_dst, 32), batch)](
        x, dst_index, dst_unit, num_dst, channels, x.stride(0), x.stride(1), BLOCK_D=32, BLOCK_C=block_c
    )
    score = torch.empty(batch, n_tokens, device=x.device, dtype=torch.float32)
    best = torch.empty(batch, n_tokens, device=x.device, dtype=torch.int64)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), batch)  # noqa: E731
    _best_destination_kernel[grid](
        x, dst_unit, is_dst, score, best,
        n_tokens, num_dst, channels, x.stride(0), x.stride(1), dst_unit.stride(0), dst_unit.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_C=block_c,
    )  # fmt: skip
    return score, best


# Eager calls at up to 4096 tokens (SD 512px, SDXL 1024px) are bound by the host: there the pairwise
# ranking, one launch, beats a sort and a slot pass (39 against ~100 us of host time per block); on the
# GPU, and so inside CUDA graphs, the sort is faster (30 against 38 us at 4096 tokens, 75 against 125
# at 9216). H100, batch 2: scripts/results/2026-11-23-h100/kernels.md.
PAIRWISE_MAX_TOKENS = 4096


def assign_slots(score, best, is_dst, dst_slot, num_dst: int, num_merged: int, num_agent_merged: int | None):
    """score, best (B, N) -> slot (B, N) and agent slot (B, N) or None; see merge.assign_slots."""
    batch, n_tokens = score.shape
    slot = torch.empty_like(best)
    agent_slot = torch.empty_like(best) if num_agent_merged is not None else slot
    counts = (n_tokens, num_dst, num_merged, num_agent_merged or 0)
    has_agents = num_agent_merged is not None
    capturing = score.is_cuda and torch.cuda.is_current_stream_capturing()
    if n_tokens <= PAIRWISE_MAX_TOKENS and not capturing:
        block_i, block_j = (64, 256) if not INTERPRET else (16, 32)
        _pairwise_slots_kernel[(triton.cdiv(n_tokens, block_i), batch)](
            score, best, is_dst, dst_slot, slot, agent_slot, *counts, HAS_AGENTS=has_agents, BLOCK_I=block_i, BLOCK_J=block_j
        )
    else:
        order = score.argsort(dim=-1, descending=True, stable=True)
        block = 1024 if not INTERPRET else 64
        _order_slots_kernel[(triton.cdiv(n_tokens, block), batch)](
            order, best, is_dst, dst_slot, slot, agent_slot, *counts, HAS_AGENTS=has_agents, BLOCK=block
        )
    return slot, (agent_slot if has_agents else None)


# 2**24 steps per unit: fp16's largest value summed over 65536 tokens stays inside int64 (7e16 < 9e18)
_FIXED_POINT = float(2**24)


def merge_mean(x: torch.Tensor, slot, agent_slot, dst_index, is_dst, num_slots: int, num_agents: int | None):
    """(B, N, C) -> the merged sequence (B, num_slots, C) and the agents (B, num_agents, C) or None:
    each slot the mean of its tokens, deterministic. Destinations hold slots 0..D-1 in both plans."""
    batch, n_tokens, channels = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    has_agents = agent_slot is not None
    num_dst = dst_index.numel()
    merged = torch.empty(batch, num_slots, channels, device=x.device, dtype=x.dtype)
    agents = torch.empty(batch, num_agents, channels, device=x.device, dtype=x.dtype) if has_agents else merged
    sums = torch.zeros(batch, num_dst, (channels + 1) * (1 + has_agents), device=x.device, dtype=torch.int64)
    block_t, block_c = (32, 64) if not INTERPRET else (16, 16)
    _scatter_kernel[(triton.cdiv(n_tokens, block_t), triton.cdiv(channels, block_c), batch)](
        x, slot, agent_slot if has_agents else slot, is_dst, merged, agents, sums,
        n_tokens, channels, num_dst, num_slots, num_agents or 0, x.stride(0), x.stride(1),
        HAS_AGENTS=has_agents, SCALE=_FIXED_POINT, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    _destination_mean_kernel[(triton.cdiv(num_dst, block_t), triton.cdiv(channels, block_c), batch)](
        x, dst_index, sums, merged, agents, num_dst, channels, num_slots, num_agents or 0, x.stride(0), x.stride(1),
        HAS_AGENTS=has_agents, SCALE=_FIXED_POINT, BLOCK_D=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    return merged, (agents if has_agents else None)
