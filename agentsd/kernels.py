"""Triton kernels of the merge plan and the merge, used on CUDA; merge.py's torch code is their reference.

- destinations: the destination pattern of a level in one launch (the torch code takes ~15 tiny ones);
- best_destination: cosine similarity of every token to every destination, reduced to the best
  one on the fly: the (B, N, D) similarity matrix is never written (1 GB per block at 2048px);
- slots_from_order: the slots of every token from the sort order, for both plans in one pass;
- merge_mean: scatter-mean with atomics on 64-bit fixed point: integer addition does not depend
  on the order of the atomics, so results are deterministic (float atomics are not), and there is
  one count per slot (torch's scatter_reduce("mean") keeps one per element).
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
        key_ptr, key_value, index_ptr, slot_ptr, is_dst_ptr,
        height, width, cells_x, num_cells, downsample,
        SY: tl.constexpr, SX: tl.constexpr, KEY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if KEY == 1:
            key = tl.load(key_ptr)
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
    def _slots_kernel(
        order_ptr, best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr,
        N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        rank = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rank < N
        token = tl.load(order_ptr + b * N + rank, mask=ok, other=0)
        best = tl.load(best_ptr + b * N + token, mask=ok, other=0)
        is_dst = tl.load(is_dst_ptr + token, mask=ok, other=0) != 0
        own_slot = tl.load(dst_slot_ptr + token, mask=ok, other=0)
        slot = tl.where(is_dst, own_slot, tl.where(rank < num_merged, best, rank + (D - num_merged)))
        tl.store(slot_ptr + b * N + token, slot, mask=ok)
        if HAS_AGENTS:
            agent_slot = tl.where(is_dst, own_slot, tl.where(rank < num_agent_merged, best, rank + (D - num_agent_merged)))
            tl.store(agent_slot_ptr + b * N + token, agent_slot, mask=ok)

    @triton.jit
    def _scatter_sum_kernel(
        x_ptr, slot_ptr, sum_ptr, count_ptr,
        N, C, S, stride_xb, stride_xn,
        SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(2)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = tokens < N
        slot = tl.load(slot_ptr + b * N + tokens, mask=ok, other=0)
        if tl.program_id(1) == 0:
            tl.atomic_add(count_ptr + b * S + slot, 1, mask=ok)
        mask = ok[:, None] & (cols[None, :] < C)
        x = tl.load(x_ptr + b * stride_xb + tokens[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
        fixed = (x.to(tl.float32) * SCALE).to(tl.int64)
        tl.atomic_add(sum_ptr + (b * S + slot[:, None]) * C + cols[None, :], fixed, mask=mask)

    @triton.jit
    def _divide_kernel(sum_ptr, count_ptr, out_ptr, rows, C, SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = r < rows
        mask = ok[:, None] & (cols[None, :] < C)
        count = tl.load(count_ptr + r, mask=ok, other=1).to(tl.float32)
        total = tl.load(sum_ptr + r[:, None] * C + cols[None, :], mask=mask, other=0).to(tl.float32)
        mean = total * (1.0 / SCALE) / count[:, None]
        tl.store(out_ptr + r[:, None] * C + cols[None, :], mean.to(out_ptr.dtype.element_ty), mask=mask)


def destinations(height: int, width: int, sy: int, sx: int, downsample: int, key, device):
    """(index (D,), slot (N,), is_dst (N,)) as merge.choose_destinations computes them."""
    cells_x, num_cells = width // sx, (height // sy) * (width // sx)
    num_tokens = height * width
    index = torch.empty(num_cells, dtype=torch.int64, device=device)
    slot = torch.empty(num_tokens, dtype=torch.int64, device=device)
    is_dst = torch.empty(num_tokens, dtype=torch.bool, device=device)
    mode = 0 if key is None else (1 if torch.is_tensor(key) else 2)
    block = 1024 if not INTERPRET else 64
    _destinations_kernel[(triton.cdiv(num_tokens, block),)](
        key if mode == 1 else index, key if mode == 2 else 0, index, slot, is_dst,
        height, width, cells_x, num_cells, downsample, SY=sy, SX=sx, KEY=mode, BLOCK=block,
    )  # fmt: skip
    return index, slot, is_dst


def best_destination(x: torch.Tensor, dst_unit: torch.Tensor, is_dst: torch.Tensor):
    """x (B, N, C), dst_unit (B, D, C) unit-length destinations -> cosine score and index of the
    best destination, (B, N) float32 and int64; the score is -inf at destination tokens."""
    batch, n_tokens, channels = x.shape
    x = x.contiguous()
    dst_unit = dst_unit.to(x.dtype).contiguous()
    score = torch.empty(batch, n_tokens, device=x.device, dtype=torch.float32)
    best = torch.empty(batch, n_tokens, device=x.device, dtype=torch.int64)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), batch)  # noqa: E731
    _best_destination_kernel[grid](
        x, dst_unit, is_dst, score, best,
        n_tokens, dst_unit.shape[1], channels, x.stride(0), x.stride(1), dst_unit.stride(0), dst_unit.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_C=min(64, max(16, triton.next_power_of_2(channels))),
    )  # fmt: skip
    return score, best


def slots_from_order(order, best, is_dst, dst_slot, num_dst: int, num_merged: int, num_agent_merged: int | None):
    """order, best (B, N) -> slot (B, N) and agent slot (B, N) or None; see merge.plan_merge."""
    batch, n_tokens = order.shape
    slot = torch.empty_like(order)
    agent_slot = torch.empty_like(order) if num_agent_merged is not None else slot
    block = 1024 if not INTERPRET else 64
    _slots_kernel[(triton.cdiv(n_tokens, block), batch)](
        order, best, is_dst, dst_slot, slot, agent_slot, n_tokens, num_dst, num_merged, num_agent_merged or 0,
        HAS_AGENTS=num_agent_merged is not None, BLOCK=block,
    )  # fmt: skip
    return slot, (agent_slot if num_agent_merged is not None else None)


# 2**28 steps per unit: values up to fp16's 65504 summed over ~1000 tokens stay far inside int64
_FIXED_POINT = float(2**28)


def merge_mean(x: torch.Tensor, slot: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, N, C) -> (B, num_slots, C), the mean of the tokens in each slot, deterministic."""
    batch, n_tokens, channels = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    total = torch.zeros(batch, num_slots, channels, device=x.device, dtype=torch.int64)
    count = torch.zeros(batch, num_slots, device=x.device, dtype=torch.int32)
    block_t, block_c = (32, 64) if not INTERPRET else (16, 16)
    _scatter_sum_kernel[(triton.cdiv(n_tokens, block_t), triton.cdiv(channels, block_c), batch)](
        x, slot, total, count, n_tokens, channels, num_slots, x.stride(0), x.stride(1),
        SCALE=_FIXED_POINT, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    out = torch.empty(batch, num_slots, channels, device=x.device, dtype=x.dtype)
    rows = batch * num_slots
    _divide_kernel[(triton.cdiv(rows, block_t), triton.cdiv(channels, block_c))](
        total, count, out, rows, channels, SCALE=_FIXED_POINT, BLOCK_R=block_t, BLOCK_C=block_c
    )
    return out
