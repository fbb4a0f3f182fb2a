"""Triton kernels of the merge plan and the merge, used on CUDA; merge.py's torch code is their reference.

- destinations: the destination pattern of a level in one launch (the torch code takes ~15 tiny ones);
- best_destination: cosine similarity of every token to every destination, reduced to the best
  one on the fly, destinations gathered and normalised inside: the (B, N, D) similarity matrix is
  never written (1 GB per block at 2048px);
- rank_and_slots: rank, slot and destination group of every token from the sort order, one pass;
- merge_groups: the mean of each slot's tokens, one program per block of slots, from the tokens
  sorted by destination group: no atomics, so results are deterministic (scatter-mean with
  atomics is not), and no float32 scratch buffer.
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
    """Whether the kernels run for a tensor or device."""
    device = x.device if torch.is_tensor(x) else torch.device(x)
    return triton is not None and ENABLED and device.type == "cuda"


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
            triton.Config({"BLOCK_M": 64, "BLOCK_D": 128}, num_warps=4, num_stages=4),
        ]
        if not INTERPRET
        else [triton.Config({"BLOCK_M": 16, "BLOCK_D": 16})],
        key=["N", "D", "C"],
    )
    @triton.jit
    def _best_destination_kernel(
        x_ptr, dst_index_ptr, is_dst_ptr, score_ptr, best_ptr,
        N, D, C, stride_xb, stride_xn,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        x_batch = x_ptr + b * stride_xb
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N

        squared_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_batch + rows[:, None] * stride_xn + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0)
            squared_norm += tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=1)

        best_score = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best = tl.zeros([BLOCK_M], dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            dsts = d0 + tl.arange(0, BLOCK_D)
            dst_ok = dsts < D
            dst_rows = tl.load(dst_index_ptr + dsts, mask=dst_ok, other=0)
            dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dst_squared_norm = tl.zeros([BLOCK_D], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                col_ok = cols < C
                x = tl.load(x_batch + rows[:, None] * stride_xn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                d = tl.load(x_batch + dst_rows[None, :] * stride_xn + cols[:, None], mask=dst_ok[None, :] & col_ok[:, None], other=0.0)
                dst_squared_norm += tl.sum(d.to(tl.float32) * d.to(tl.float32), axis=0)
                if IEEE:
                    dot = tl.dot(x, d, dot, input_precision="ieee")
                else:
                    dot = tl.dot(x, d, dot)
            score = dot / tl.sqrt(tl.where(dst_ok, dst_squared_norm, 1.0))[None, :]
            score = tl.where(dst_ok[None, :], score, float("-inf"))
            tile_score = tl.max(score, axis=1)
            tile_best = tl.argmax(score, axis=1).to(tl.int32) + d0
            better = tile_score > best_score
            best_score = tl.where(better, tile_score, best_score)
            best = tl.where(better, tile_best, best)

        score = best_score / tl.sqrt(squared_norm)
        is_dst = tl.load(is_dst_ptr + rows, mask=row_ok, other=0)
        score = tl.where(is_dst != 0, float("-inf"), score)
        tl.store(score_ptr + b * N + rows, score, mask=row_ok)
        tl.store(best_ptr + b * N + rows, best.to(tl.int64), mask=row_ok)

    @triton.jit
    def _rank_and_slots_kernel(
        order_ptr, best_ptr, is_dst_ptr, dst_slot_ptr, rank_ptr, slot_ptr, group_ptr,
        N, D, num_merged, BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        rank = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rank < N
        token = tl.load(order_ptr + b * N + rank, mask=ok, other=0)
        best = tl.load(best_ptr + b * N + token, mask=ok, other=0)
        is_dst = tl.load(is_dst_ptr + token, mask=ok, other=0) != 0
        own_slot = tl.load(dst_slot_ptr + token, mask=ok, other=0)
        group = tl.where(is_dst, own_slot, best)
        slot = tl.where(is_dst | (rank < num_merged), group, rank + (D - num_merged))
        tl.store(rank_ptr + b * N + token, rank.to(tl.int64), mask=ok)
        tl.store(slot_ptr + b * N + token, slot, mask=ok)
        tl.store(group_ptr + b * N + token, group, mask=ok)

    @triton.jit
    def _merge_groups_kernel(
        x_ptr, out_ptr, members_ptr, group_start_ptr, order_ptr, rank_ptr, is_dst_ptr,
        N, C, D, num_slots, num_merged, stride_xb, stride_xn,
        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(1)
        x_batch = x_ptr + b * stride_xb
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < num_slots
        is_group = s < D  # slots below D are destinations with the sources merged into them
        start = tl.load(group_start_ptr + b * (D + 1) + s, mask=s_ok & is_group, other=0)
        end = tl.load(group_start_ptr + b * (D + 1) + s + 1, mask=s_ok & is_group, other=0)
        length = tl.where(s_ok, tl.where(is_group, end - start, 1), 0)
        # the other slots hold one unmerged source each, in rank order after the merged ones
        single = tl.load(order_ptr + b * N + num_merged + s - D, mask=s_ok & ~is_group, other=0)
        longest = tl.max(length, axis=0)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            total = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
            count = tl.zeros([BLOCK_S], dtype=tl.float32)
            for i in range(0, longest):
                live = i < length
                member = tl.load(members_ptr + b * N + start + i, mask=live & is_group, other=0)
                token = tl.where(is_group, member, single)
                dst = tl.load(is_dst_ptr + token, mask=live, other=0) != 0
                merged = tl.load(rank_ptr + b * N + token, mask=live, other=N) < num_merged
                take = live & (~is_group | dst | merged)
                rows = tl.load(x_batch + token[:, None] * stride_xn + cols[None, :], mask=take[:, None] & col_ok[None, :], other=0.0)
                total += rows.to(tl.float32)
                count += take.to(tl.float32)
            mean = total / tl.maximum(count, 1.0)[:, None]
            out = out_ptr + (b * num_slots + s[:, None]) * C + cols[None, :]
            tl.store(out, mean.to(out_ptr.dtype.element_ty), mask=s_ok[:, None] & col_ok[None, :])


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


def best_destination(x: torch.Tensor, dst_index: torch.Tensor, is_dst: torch.Tensor):
    """x (B, N, C) -> cosine score of the best destination and its index, (B, N) float32 and int64;
    -inf at destination tokens."""
    batch, n_tokens, channels = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    score = torch.empty(batch, n_tokens, device=x.device, dtype=torch.float32)
    best = torch.empty(batch, n_tokens, device=x.device, dtype=torch.int64)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_M"]), batch)  # noqa: E731
    _best_destination_kernel[grid](
        x, dst_index, is_dst, score, best, n_tokens, dst_index.numel(), channels, x.stride(0), x.stride(1),
        IEEE=x.dtype == torch.float32, BLOCK_C=min(64, max(16, triton.next_power_of_2(channels))),
    )  # fmt: skip
    return score, best


def rank_and_slots(order, best, is_dst, dst_slot, num_dst: int, num_merged: int):
    """order, best (B, N) -> rank, slot and destination group of every token, (B, N) int64 each."""
    batch, n_tokens = order.shape
    rank, slot, group = (torch.empty_like(order) for _ in range(3))
    block = 1024 if not INTERPRET else 64
    _rank_and_slots_kernel[(triton.cdiv(n_tokens, block), batch)](
        order, best, is_dst, dst_slot, rank, slot, group, n_tokens, num_dst, num_merged, BLOCK=block
    )
    return rank, slot, group


def merge_groups(x, members, group_start, order, rank, is_dst, num_dst: int, num_merged: int) -> torch.Tensor:
    """(B, N, C) -> (B, N - num_merged, C): the mean of every slot's tokens (see merge.merge)."""
    batch, n_tokens, channels = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_slots = n_tokens - num_merged
    out = torch.empty(batch, num_slots, channels, device=x.device, dtype=x.dtype)
    block_s, block_c = (32, min(128, triton.next_power_of_2(channels))) if not INTERPRET else (16, 16)
    _merge_groups_kernel[(triton.cdiv(num_slots, block_s), batch)](
        x, out, members, group_start, order, rank, is_dst,
        n_tokens, channels, num_dst, num_slots, num_merged, x.stride(0), x.stride(1),
        BLOCK_S=block_s, BLOCK_C=block_c,
    )  # fmt: skip
    return out
