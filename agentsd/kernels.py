"""Triton kernels of the merge plan, the merge and the unmerge, used on CUDA; merge.py's torch code
is their reference.

Per block and call, three phases (a block at 512px in eager mode is bound by the host, so each
phase is as few launches as its data flow allows):
- plan (steps 1-4): one workspace holds all of the plan (_layout).
  - prologue: the destination pattern, drawn from the call's timestep tensor; the destinations'
    rows L2-normalised, with score -inf; the merge's sums and the selection's counters zeroed;
  - matching: the cosine similarity of every source to every destination, reduced to the best one
    as it goes: the (B, N - D, D) similarity matrix is never written (1 GB per block at 2048px).
    Where they fit, a program's rows are loaded once and stay resident as the MMA's first operand,
    in registers or partly in shared memory (SD 1.x and 2.x level 1);
  - selection: which sources merge (the t best scores), by a selection of the t-th score (no
    sort): one program per batch row up to 4096 tokens (run by the resident matching's last
    program of the row where it is used), else a radix selection in five launches;
- merge: the merged sequence and the agents in one pass over x. Unmerged tokens are copied;
  merged sources are summed into their destination with atomics on 64-bit fixed point: integer
  addition does not depend on the order of the atomics, so results are deterministic (float atomics
  are not). The agents reuse the sums of the first plan (its merged sources are theirs too). The
  atomics are relaxed: nothing orders them (acq_rel, Triton's default, made the merge 2-3x slower).
  A second launch divides by the counts and leaves the sums zero for the plan's next merge;
- unmerge: every token the row of its slot, plus the block's residual where lean_forward asks.

Kernels launch through Triton's public API (`kernel[grid](...)`). Under torch.compile each phase
runs as a custom op (`torch.ops.agentsd.plan`, `.merge`, `.unmerge`).
"""

import functools
import inspect
import math
import os
from typing import NamedTuple

import torch

from . import tuned_configs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: merge.py runs its torch code
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the tests call kernels directly
ENABLED = os.environ.get("AGENTSD_KERNELS", "1") != "0"  # AGENTSD_KERNELS=0 runs the torch code on CUDA too


def available(x) -> bool:
    """Whether the kernels run for a tensor or device: on CUDA, in eager calls, CUDA graphs and
    torch.compile (there as custom ops, see _compilable)."""
    device = x.device if torch.is_tensor(x) else torch.device(x)
    return triton is not None and ENABLED and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _mix32(x):  # merge._mix32 on int64, the same constants
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        return (x >> 16) ^ x

    @triton.jit
    def _cell_offset(cell, key, downsample, SY: tl.constexpr, SX: tl.constexpr, KEY: tl.constexpr):
        """Where in its cell (row-major, < SY * SX) a cell's destination sits: merge.choose_destinations."""
        if KEY == 0:
            return cell * 0
        return (_mix32((_mix32(cell.to(tl.int64) * 16 + downsample) + key) & 0xFFFFFFFF) % (SY * SX)).to(tl.int32)

    @triton.jit
    def _zero_rows(rows, ok, width, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Zero `width` int64 values from each of the row pointers `rows` where `ok`."""
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            tl.store(rows[:, None] + cols[None, :], tl.zeros([BLOCK_ROWS, BLOCK], tl.int64), mask=ok[:, None] & (cols[None, :] < width))

    @triton.jit
    def _rest_token(rest, N, W, SY: tl.constexpr, SX: tl.constexpr):
        """Position of the rest-th token outside the complete cells of an N-token grid W wide: those
        right of the cells, row by row, then those below them."""
        cells_x, cells_y = W // SX, N // W // SY
        right = tl.maximum(W - cells_x * SX, 1)
        right_count = cells_y * SY * (W - cells_x * SX)
        right_token = (rest // right) * W + cells_x * SX + rest % right
        return tl.where(rest < right_count, right_token, cells_y * SY * W + rest - right_count)

    @triton.jit
    def _prologue_kernel(
        x_ptr, timestep_ptr, seed, key_value, token_cell_ptr, dst_index_ptr, dst_unit_ptr, score_ptr, best_ptr,
        sums_ptr, counters_ptr, N, C, W, downsample, sums_width, num_counters, stride_xb, stride_xn, stride_xc,
        SY: tl.constexpr, SX: tl.constexpr, KEY: tl.constexpr, CELL: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_REST: tl.constexpr,
    ):  # fmt: skip
        """Everything of a plan that comes before the matching, in one launch (step 1 and setup).

        Programs (i, b) with i below cdiv(D, BLOCK_D), for their cells: the destination pattern
        (batch row 0: dst_index (D,), and token_cell (N,), a destination's cell or -1), the
        destinations' rows of x L2-normalised into dst_unit (B, D, C) in x's dtype, score -inf (never
        merged) and best = its own cell at their positions, and the merge's sums zeroed. The
        programs after them: token_cell -1 for the tokens outside the complete cells (row 0), and
        the selection's counters zeroed (num_counters per batch row). KEY 0: top-left destinations; 1: the key of
        merge.random_key(seed, timestep), drawn here from the timestep tensor; 2: key_value."""
        b = tl.program_id(1)
        cells_x = W // SX
        num_cells = (N // W // SY) * cells_x
        cell_programs = tl.cdiv(num_cells, BLOCK_D)
        if tl.program_id(0) < cell_programs:
            if KEY == 1:
                bits = tl.load(timestep_ptr).to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                key = _mix32(bits ^ seed)
            else:
                key = key_value
            cell = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
            ok = cell < num_cells
            offset = _cell_offset(cell, key, downsample, SY, SX, KEY)
            cell_row, cell_col = cell // cells_x, cell % cells_x
            token = (cell_row * SY + offset // SX) * W + cell_col * SX + offset % SX
            if b == 0:
                tl.store(dst_index_ptr + cell, token, mask=ok)
                k = tl.arange(0, CELL)[None, :]
                in_cell = (cell_row[:, None] * SY + k // SX) * W + cell_col[:, None] * SX + k % SX
                own = tl.where(k == offset[:, None], cell[:, None], -1)
                tl.store(token_cell_ptr + in_cell, own, mask=ok[:, None] & (k < SY * SX))
            tl.store(score_ptr + b * N + token, tl.full([BLOCK_D], float("-inf"), tl.float32), mask=ok)
            tl.store(best_ptr + b * N + token, cell, mask=ok)
            rows = x_ptr + b * stride_xb + token * stride_xn
            squared_norm = tl.zeros([BLOCK_D], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = ok[:, None] & (cols[None, :] < C)
                v = tl.load(rows[:, None] + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
                squared_norm += tl.sum(v * v, axis=1)
            inverse = 1.0 / tl.sqrt(squared_norm)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = ok[:, None] & (cols[None, :] < C)
                v = tl.load(rows[:, None] + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32) * inverse[:, None]
                tl.store(dst_unit_ptr + (b * num_cells + cell[:, None]) * C + cols[None, :], v.to(dst_unit_ptr.dtype.element_ty), mask=mask)
            _zero_rows(sums_ptr + (b * num_cells + cell) * sums_width, ok, sums_width, BLOCK_D, BLOCK_C)
        else:
            rest = (tl.program_id(0) - cell_programs) * BLOCK_REST + tl.arange(0, BLOCK_REST)
            if b == 0:
                token = _rest_token(rest, N, W, SY, SX)
                tl.store(token_cell_ptr + token, tl.full([BLOCK_REST], -1, tl.int32), mask=rest < N - num_cells * SY * SX)
            tl.store(counters_ptr + b * num_counters + rest, tl.zeros([BLOCK_REST], tl.int32), mask=rest < num_counters)

    @triton.jit
    def _dot_update(dot, x, d, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(x, d, dot, input_precision="ieee")
        return tl.dot(x, d, dot)

    @triton.jit
    def _source_tokens(ordinal, dst_index_ptr, N, W, SY: tl.constexpr, SX: tl.constexpr):
        """Token positions of the sources of an N-token grid W wide, numbered in cell order: the
        sy*sx - 1 sources of each complete cell (its destination skipped), then the tokens right of
        the complete cells, then those below them."""
        cells_x, cells_y = W // SX, N // W // SY
        rest = ordinal - cells_x * cells_y * (SY * SX - 1)  # < 0: in a complete cell
        in_cells = rest < 0
        cell, k = ordinal // (SY * SX - 1), ordinal % (SY * SX - 1)
        cell_row, cell_col = cell // cells_x, cell % cells_x
        dst = tl.load(dst_index_ptr + cell, mask=in_cells, other=0).to(tl.int32)
        dst_offset = (dst // W - cell_row * SY) * SX + dst % W - cell_col * SX
        offset = k + (k >= dst_offset)
        cell_token = (cell_row * SY + offset // SX) * W + cell_col * SX + offset % SX
        return tl.where(in_cells, cell_token, _rest_token(rest, N, W, SY, SX))

    @triton.jit
    def _keep_best(dot, d0, dsts, D, best_dot, best, EVEN_D: tl.constexpr):
        """Fold a tile of dot products (rows x destinations dsts) into the best so far (ties: lower index)."""
        if not EVEN_D:  # the tile runs past the last destination
            dot = tl.where(dsts[None, :] < D, dot, float("-inf"))
        tile_best_dot, tile_best = tl.max(dot, axis=1, return_indices=True)
        better = tile_best_dot > best_dot
        return tl.where(better, tile_best_dot, best_dot), tl.where(better, tile_best.to(tl.int32) + d0, best)

    @triton.jit
    def _store_best(score, best, score_ptr, best_ptr, b, N, tokens, row_ok):
        """Cosine score and index of each source's best destination, at its token position."""
        tl.store(score_ptr + b * N + tokens, score, mask=row_ok)
        tl.store(best_ptr + b * N + tokens, best, mask=row_ok)

    def _matching_configs(*configs):
        """Autotuning candidates (BLOCK_M, BLOCK_D, num_warps, num_stages[, SHARED_ROWS]); one small
        tile in the interpreter (tests force the others through _matching_configs_found)."""
        shared = lambda config: {"SHARED_ROWS": config[4]} if len(config) > 4 else {}  # noqa: E731
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_D": 16, **shared(configs[0])})]
        return [triton.Config({"BLOCK_M": c[0], "BLOCK_D": c[1], **shared(c)}, num_warps=c[2], num_stages=c[3]) for c in configs]

    @triton.autotune(
        configs=_matching_configs((128, 64, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (256, 128, 8, 3)),
        key=["N", "D", "C", "D_PER_SPLIT"],
    )
    @triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
    @triton.jit
    def _best_destination_kernel(
        x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr,
        N, D, C, W, stride_xb, stride_xn, stride_db, stride_dd, D_PER_SPLIT,
        SY: tl.constexpr, SX: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_D: tl.constexpr,
    ):  # fmt: skip
        """Rows: the sources, by ordinal (_source_tokens); dst: the unit destinations (B, D, C).
        Program (i, b, s) matches its rows against destinations [s, s + 1) * D_PER_SPLIT (a multiple
        of BLOCK_D) and writes to score_ptr / best_ptr + s * B * N (its part, see _combine_splits_kernel)."""
        b = tl.program_id(1)
        split_offset = tl.program_id(2) * tl.num_programs(1) * N
        d_start = tl.program_id(2) * D_PER_SPLIT
        sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = sources < N - D
        tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
        x_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xn
        dst_base = dst_ptr + b * stride_db

        squared_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < C), other=0.0).to(tl.float32)
            squared_norm += tl.sum(x * x, axis=1)

        best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best = tl.zeros([BLOCK_M], dtype=tl.int32)
        for d0 in range(d_start, tl.minimum(D, d_start + D_PER_SPLIT), BLOCK_D):
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
                dot = _dot_update(dot, x, d, IEEE)
            best_dot, best = _keep_best(dot, d0, dsts, D, best_dot, best, EVEN_D)

        score = best_dot / tl.sqrt(squared_norm)
        _store_best(score, best, score_ptr + split_offset, best_ptr + split_offset, b, N, tokens, row_ok)

    @triton.jit
    def _combine_splits_kernel(
        part_score_ptr, part_best_ptr, dst_index_ptr, score_ptr, best_ptr, N, D, W, SPLITS,
        SY: tl.constexpr, SX: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """score / best of every source = the best of the splits' parts (SPLITS, B, N); of equal
        scores the earlier split's (lower destination index) stays."""
        b = tl.program_id(1)
        sources = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = sources < N - D
        tokens = b * N + _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
        score = tl.load(part_score_ptr + tokens, mask=ok)
        best = tl.load(part_best_ptr + tokens, mask=ok)
        for s in range(1, SPLITS):
            part = s * tl.num_programs(1) * N + tokens
            other = tl.load(part_score_ptr + part, mask=ok)
            better = other > score
            score = tl.where(better, other, score)
            best = tl.where(better, tl.load(part_best_ptr + part, mask=ok), best)
        tl.store(score_ptr + tokens, score, mask=ok)
        tl.store(best_ptr + tokens, best, mask=ok)

    @triton.jit
    def _rows(x_rows, cols, row_ok, stride_xc, IN_REGISTERS: tl.constexpr, IEEE: tl.constexpr):
        """x's rows at `cols`, unchanged, as an MMA's first operand, and their squared norms (float32).

        IN_REGISTERS: the rows come out of a product with the identity (exact), in an MMA accumulator's
        layout: only from that layout does Triton hand an MMA its first operand in registers (Hopper's
        wgmma) rather than through shared memory. Else the MMA reads them from shared memory. The
        norms come from the loaded rows: taken from the MMA's output they cost 5-10% (bm256.md)."""
        x = tl.load(x_rows + cols[None, :] * stride_xc, mask=row_ok[:, None], other=0.0)
        wide = x.to(tl.float32)
        squared_norm = tl.sum(wide * wide, axis=1)
        if IN_REGISTERS:
            identity = (cols[:, None] == cols[None, :]).to(x.dtype)
            x = _dot_update(tl.zeros(x.shape, dtype=tl.float32), x, identity, IEEE).to(x.dtype)
        return x, squared_norm

    @triton.autotune(
        # Shared memory holds the stages of destination tiles (40 KB each at 320 channels, fp16; H100:
        # 227 KB) and, with SHARED_ROWS, the rows past the first C_A channels (96 KB for 256 rows). The
        # fifth candidate fits wherever _resident_split chooses this kernel; candidates that do not fit
        # a GPU are skipped by the autotuner.
        configs=_matching_configs(
            *[(m, d, w, st, False) for m, d, w, st in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 4), (64, 64, 4, 2))],
            (256, 64, 16, 3, True),
        ),
        key=["N", "D", "C_A", "C_B", "C_REST"],
    )
    @triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
    @triton.jit
    def _best_destination_resident_kernel(
        x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, done_ptr,
        N, D, W, num_merged, num_agent_merged, stride_xb, stride_xn, stride_xc, stride_db, stride_dd,
        SY: tl.constexpr, SX: tl.constexpr, IEEE: tl.constexpr,
        C_A: tl.constexpr, C_B: tl.constexpr, C_REST: tl.constexpr, SELECT: tl.constexpr, HAS_AGENTS: tl.constexpr,
        SELECT_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, SHARED_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
    ):  # fmt: skip
        """_best_destination_kernel for C = C_A + C_B + C_REST channels (powers of two up to 128; C_B
        and C_REST may be 0): a program's rows are loaded once and stay resident as the MMA's first
        operand while the destination tiles stream by: all in registers, or (SHARED_ROWS) the first
        C_A channels in registers and the rest in shared memory. The rows stay as they are (a row's
        best destination does not depend on its norm); the best dot product is divided by the norm.

        Registers: 1.11x against rows in shared memory at 128 rows (65536 tokens, 2x2 cells; 1.2-1.5x
        at 4096; matching_registers.md). SHARED_ROWS makes room for 256 rows per program (16 warps),
        which halves what each destination tile costs in L2 bandwidth: 1.19-1.22x from 16384 tokens
        (bm256.md; both in scripts/results/2026-11-24-h100/).

        SELECT: the last program of a batch row to finish also selects that row's slots, as
        _one_program_slots_kernel does (one launch less per block where eager calls are bound by
        the host); done (B,) counts the finished programs, zero before and after."""
        b = tl.program_id(1)
        sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = sources < N - D
        tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
        x_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xn
        # The shared parts first: their registers are free again before the first part's are taken.
        squared_norm = tl.zeros([BLOCK_M], dtype=tl.float32)
        if C_B > 0:
            cols_b = C_A + tl.arange(0, C_B)
            rows_b, part = _rows(x_rows, cols_b, row_ok, stride_xc, not SHARED_ROWS, IEEE)
            squared_norm += part
        if C_REST > 0:
            cols_rest = C_A + C_B + tl.arange(0, C_REST)
            rows_rest, part = _rows(x_rows, cols_rest, row_ok, stride_xc, not SHARED_ROWS, IEEE)
            squared_norm += part
        cols_a = tl.arange(0, C_A)
        rows_a, part = _rows(x_rows, cols_a, row_ok, stride_xc, True, IEEE)
        inverse_norm = tl.where(row_ok, 1.0 / tl.sqrt(squared_norm + part), 0.0)  # padding rows: 0, not NaN

        dst_base = dst_ptr + b * stride_db
        in_tile = tl.arange(0, BLOCK_D)
        # With the rows in registers each thread keeps the best of its own accumulator slots over the
        # destination tiles (a compare and two selects per slot, no exchange between threads), reduced
        # once after the last tile: 1.03-1.07x against a reduction per tile from 16384 tokens up, 1.02x
        # at 4096 (slot_best.md). At 16 warps (128 registers per thread) that state would spill.
        if SHARED_ROWS:
            best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            best = tl.zeros([BLOCK_M], dtype=tl.int32)
        else:
            slot_dot = tl.full([BLOCK_M, BLOCK_D], float("-inf"), dtype=tl.float32)
            slot_d0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            dsts = d0 + in_tile
            dst_cols = dst_base + dsts[None, :] * stride_dd
            in_d = dsts[None, :] < D
            dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dot = _dot_update(dot, rows_a, tl.load(dst_cols + cols_a[:, None], mask=in_d, other=0.0), IEEE)
            if C_B > 0:
                dot = _dot_update(dot, rows_b, tl.load(dst_cols + cols_b[:, None], mask=in_d, other=0.0), IEEE)
            if C_REST > 0:
                dot = _dot_update(dot, rows_rest, tl.load(dst_cols + cols_rest[:, None], mask=in_d, other=0.0), IEEE)
            if SHARED_ROWS:
                best_dot, best = _keep_best(dot, d0, dsts, D, best_dot, best, EVEN_D)
            else:
                if not EVEN_D:
                    dot = tl.where(in_d, dot, float("-inf"))
                better = dot > slot_dot  # strictly: of equal scores the earlier tile's stays
                slot_dot = tl.where(better, dot, slot_dot)
                slot_d0 = tl.where(better, d0, slot_d0)
        if not SHARED_ROWS:
            best_dot = tl.max(slot_dot, axis=1)
            best = tl.min(tl.where(slot_dot == best_dot[:, None], slot_d0 + in_tile[None, :], D), axis=1)  # ties: lower index

        _store_best(best_dot * inverse_norm, best, score_ptr, best_ptr, b, N, tokens, row_ok)
        if SELECT:
            tl.debug_barrier()  # this program's scores are stored before it counts itself done
            if tl.atomic_add(done_ptr + b, 1, sem="acq_rel") == tl.num_programs(0) - 1:
                tl.store(done_ptr + b, 0)  # for the next launch (the autotuner launches a kernel again)
                _select_row(score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, b, N, D,
                            num_merged, num_agent_merged, HAS_AGENTS, SELECT_BLOCK)  # fmt: skip

    # Selection of the t best-scoring sources without a sort. Token order in the merged sequence is
    # free (ALGORITHM.md), so the unmerged sources take slots D, D+1, ... in token order, and only the
    # set of the t best (ties: lower index first) is needed: the t-th score is found by a radix
    # selection over its 32 bits in three histogram passes (11, 11, 10 bits). Each pass is a launch
    # over all tokens whose last program to finish reads the histogram and leaves the bits found so
    # far in `threshold`; two more launches count and assign. Up to ONE_PROGRAM_MAX_TOKENS one
    # program per batch row holds all tokens and does everything (one launch, _select_row).

    @triton.jit
    def _order_key(score):
        """float32 -> int64 in [0, 2**32), ordered as the scores (-0.0 counts as 0.0, as in a sort)."""
        bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(bits < 0, ~bits, bits | 0x80000000) & 0xFFFFFFFF

    @triton.jit
    def _pass_bits(PASS: tl.constexpr):
        return 11 if PASS < 2 else 10

    @triton.jit
    def _pass_shift(PASS: tl.constexpr):
        return 21 if PASS == 0 else (10 if PASS == 1 else 0)

    @triton.jit
    def _digit(key, PASS: tl.constexpr):
        return ((key >> _pass_shift(PASS)) & ((1 << _pass_bits(PASS)) - 1)).to(tl.int32)

    @triton.jit
    def _has_prefix(key, prefix, PASS: tl.constexpr):
        """Whether the bits of key above this pass's digit are those found so far."""
        return (key >> (_pass_shift(PASS) + _pass_bits(PASS))) == prefix

    @triton.jit
    def _choose_bin(in_bin, prefix, remaining, PASS: tl.constexpr):
        """From one pass's histogram (2048 bins, int64): the bits found so far with this pass's digit
        of the `remaining`-th largest key appended, and how many keys of that digit are still to take."""
        bins = tl.arange(0, 2048)
        through = tl.cumsum(in_bin, 0, reverse=True)  # keys in this bin or above
        above = through - in_bin
        chosen = tl.max(tl.where((above < remaining) & (through >= remaining), bins, -1), 0).to(tl.int64)
        return (prefix << _pass_bits(PASS)) | chosen, remaining - tl.sum(tl.where(bins == chosen, above, 0), 0)

    @triton.jit
    def _selection_keys(score_ptr, token_cell_ptr, b, p, ok, N):
        """Order keys of tokens p, which of them are sources, and the cell of those that are not."""
        cell = tl.load(token_cell_ptr + p, mask=ok, other=0)
        # from L2: other programs of the launch may have just written the scores (_select_row)
        score = tl.load(score_ptr + b * N + p, mask=ok, other=0.0, cache_modifier=".cg")
        return _order_key(score), ok & (cell < 0), cell

    @triton.jit
    def _slots(key, source, best, own_slot, threshold, equal_wanted, equal_before, below_before, D):
        """Slots of a block of tokens. Sources above the threshold key, and the first `equal_wanted`
        sources equal to it, join their best destination; the other sources take D + (unmerged
        sources before them in token order); destinations keep their cell's slot. equal_before and
        below_before: sources equal to / below the threshold in earlier blocks of the row."""
        equal = source & (key == threshold)
        below = source & (key < threshold)
        # One scan counts both (a program holds fewer than 2**15 tokens): below in the low 16 bits
        packed = below.to(tl.int32) + (equal.to(tl.int32) << 16)
        before = tl.cumsum(packed, 0) - packed
        equal_rank = equal_before + (before >> 16)
        merged = source & ((key > threshold) | (equal & (equal_rank < equal_wanted)))
        unmerged_rank = below_before + (before & 0xFFFF) + tl.maximum(equal_rank - equal_wanted, 0)
        return tl.where(source, tl.where(merged, best, D + unmerged_rank), own_slot)

    @triton.jit
    def _kth_key(key, ok, k, DIGIT_BITS: tl.constexpr):
        """The k-th largest of the keys where ok, and how many keys equal to it are among the k
        largest: from the top, DIGIT_BITS per step, each step a histogram of the next digit of the
        keys that share the digits found so far."""
        bins = tl.arange(0, 1 << DIGIT_BITS)
        found = tl.zeros([], dtype=tl.int64)
        left = k
        for step in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (step + 1)
            sharing = ok & ((key >> (shift + DIGIT_BITS)) == (found >> (shift + DIGIT_BITS)))
            count = tl.histogram(((key >> shift) & ((1 << DIGIT_BITS) - 1)).to(tl.int32), 1 << DIGIT_BITS, mask=sharing)
            through = tl.cumsum(count, 0, reverse=True)  # keys of this digit or above
            chosen = tl.max(tl.where(through >= left, bins, -1), 0)
            left -= tl.sum(tl.where(bins == chosen, through - count, 0), 0)
            found |= chosen.to(tl.int64) << shift
        return found, left

    @triton.jit
    def _select_row(
        score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, b, N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The selection and slots of batch row b in one program, all N (< 2**15) keys in registers.

        The t-th largest key is found 4 bits at a time (8 histograms of 16 bins per target): 17 us per
        agent-stage plan at 4096 tokens on an H100, against 34 us bit by bit (32 block-wide counts)
        and 30 us with 8-bit digits (scripts/results/2026-11-24-h100/selection_digits.md). A warp
        counts its keys for tl.histogram with ballots, not atomics: scores that crowd into one bin
        (the UNet's do) cost the same (the radix passes' histograms over many programs serialised
        on their atomics there)."""
        p = tl.arange(0, BLOCK)
        ok = p < N
        key, source, own_slot = _selection_keys(score_ptr, token_cell_ptr, b, p, ok, N)
        merged_key, merged_equal = _kth_key(key, ok, num_merged, 4)
        if HAS_AGENTS:
            agent_key, agent_equal = _kth_key(key, ok, num_agent_merged, 4)
        best = tl.load(best_ptr + b * N + p, mask=ok, other=0, cache_modifier=".cg")
        slot = _slots(key, source, best, own_slot, merged_key, merged_equal, 0, 0, D)
        tl.store(slot_ptr + b * N + p, slot, mask=ok)
        if HAS_AGENTS:
            slot = _slots(key, source, best, own_slot, agent_key, agent_equal, 0, 0, D)
            tl.store(agent_slot_ptr + b * N + p, slot, mask=ok)

    @triton.jit
    def _one_program_slots_kernel(
        score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """_select_row for batch row program_id(0)."""
        _select_row(score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, tl.program_id(0), N, D,
                    num_merged, num_agent_merged, HAS_AGENTS, BLOCK)  # fmt: skip

    @triton.jit
    def _histogram_kernel(
        score_ptr, hist_ptr, done_ptr, threshold_ptr, N, num_merged, num_agent_merged,
        PASS: tl.constexpr, HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One radix pass: counts of the next bits of the keys that share the bits found so far.

        hist (B, 5, 2048): pass 0 is shared, passes 1-2 have one row per target (merged, agents).
        threshold (B, 2, 2): per target, the leading bits of the k-th largest key found so far and
        how many keys with those bits are still to be taken; after pass 2 the key itself and how
        many keys equal to it are among the k.
        """
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < N
        key = _order_key(tl.load(score_ptr + b * N + p, mask=ok, other=0.0))
        digit = _digit(key, PASS)
        hist = hist_ptr + b * 5 * 2048
        if PASS == 0:  # every key counts, in a few bins: count inside the program first
            counts = tl.histogram(digit, 2048, mask=ok)
            tl.atomic_add(hist + tl.arange(0, 2048), counts, mask=counts > 0, sem="relaxed")
        else:
            for target in tl.static_range(1 + HAS_AGENTS):
                wanted = ok & _has_prefix(key, tl.load(threshold_ptr + (b * 2 + target) * 2), PASS)
                row = hist + (1 + 2 * target + PASS - 1) * 2048
                tl.atomic_add(row + digit, tl.full([BLOCK], 1, tl.int32), mask=wanted, sem="relaxed")

        tl.debug_barrier()  # this program's counts are in before it reports done
        if tl.atomic_add(done_ptr + b * 3 + PASS, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            for target in tl.static_range(1 + HAS_AGENTS):
                k = tl.cast(num_merged if target == 0 else num_agent_merged, tl.int64)  # a constant where it is 1
                state = threshold_ptr + (b * 2 + target) * 2
                prefix = tl.load(state) if PASS > 0 else 0
                remaining = tl.load(state + 1) if PASS > 0 else k
                row = hist + (0 if PASS == 0 else 1 + 2 * target + PASS - 1) * 2048
                in_bin = tl.load(row + tl.arange(0, 2048), cache_modifier=".cg")  # from L2, where the atomics went
                prefix, remaining = _choose_bin(in_bin.to(tl.int64), prefix, remaining, PASS)
                tl.store(state, prefix)
                tl.store(state + 1, remaining)

    @triton.jit
    def _below_counts_kernel(
        score_ptr, token_cell_ptr, threshold_ptr, counts_ptr, N, HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Per target and block of tokens: the sources equal to the threshold key and below it."""
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key, source, _ = _selection_keys(score_ptr, token_cell_ptr, b, p, p < N, N)
        for target in tl.static_range(1 + HAS_AGENTS):
            threshold = tl.load(threshold_ptr + (b * 2 + target) * 2)
            out = counts_ptr + ((b * 2 + target) * tl.num_programs(0) + tl.program_id(0)) * 2
            tl.store(out, tl.sum((source & (key == threshold)).to(tl.int32), 0))
            tl.store(out + 1, tl.sum((source & (key < threshold)).to(tl.int32), 0))

    @triton.jit
    def _slots_kernel(
        score_ptr, best_ptr, token_cell_ptr, threshold_ptr, counts_ptr, slot_ptr, agent_slot_ptr, N, D,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    ):  # fmt: skip
        """_slots for a block of tokens, after the counts of the earlier blocks."""
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < N
        best = tl.load(best_ptr + b * N + p, mask=ok, other=0)
        key, source, own_slot = _selection_keys(score_ptr, token_cell_ptr, b, p, ok, N)
        earlier = tl.arange(0, MAX_PROGRAMS)
        before = earlier < tl.program_id(0)
        for target in tl.static_range(1 + HAS_AGENTS):
            state = threshold_ptr + (b * 2 + target) * 2
            counts = counts_ptr + ((b * 2 + target) * tl.num_programs(0) + earlier) * 2
            equal_before = tl.sum(tl.load(counts, mask=before, other=0).to(tl.int64), 0)
            below_before = tl.sum(tl.load(counts + 1, mask=before, other=0).to(tl.int64), 0)
            slot = _slots(key, source, best, own_slot, tl.load(state), tl.load(state + 1), equal_before, below_before, D)
            tl.store((slot_ptr if target == 0 else agent_slot_ptr) + b * N + p, slot, mask=ok)

    @triton.jit
    def _scatter_kernel(
        x_ptr, slot_ptr, agent_slot_ptr, token_cell_ptr, merged_ptr, agents_ptr, sums_ptr,
        N, C, D, num_slots, num_agents, sums_width, stride_xb, stride_xn,
        HAS_AGENTS: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Unmerged sources are copied to their slot; merged sources are added into sums (B, D, W):
        per destination [sum (C), count] of the first plan, then [sum (C), count] of the sources only
        the agents merge (rows sums_width wide: the plan's, whether or not this merge forms agents)."""
        b = tl.program_id(2)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = tokens < N
        col_ok = cols < C
        source = ok & (tl.load(token_cell_ptr + tokens, mask=ok, other=0) < 0)
        slot = tl.load(slot_ptr + b * N + tokens, mask=ok, other=0)
        x = tl.load(x_ptr + b * stride_xb + tokens[:, None] * stride_xn + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        fixed = (x.to(tl.float32) * SCALE).to(tl.int64)

        joins = source & (slot < D)
        sums = sums_ptr + (b * D + slot) * sums_width
        tl.atomic_add(sums[:, None] + cols[None, :], fixed, mask=joins[:, None] & col_ok[None, :], sem="relaxed")
        if tl.program_id(1) == 0:
            tl.atomic_add(sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=joins, sem="relaxed")
        stays = source & (slot >= D)
        tl.store(merged_ptr + (b * num_slots + slot[:, None]) * C + cols[None, :], x, mask=stays[:, None] & col_ok[None, :])
        if HAS_AGENTS:
            agent_slot = tl.load(agent_slot_ptr + b * N + tokens, mask=ok, other=0)
            only_agents = stays & (agent_slot < D)
            agent_sums = sums_ptr + (b * D + agent_slot) * sums_width + C + 1
            tl.atomic_add(agent_sums[:, None] + cols[None, :], fixed, mask=only_agents[:, None] & col_ok[None, :], sem="relaxed")
            if tl.program_id(1) == 0:
                tl.atomic_add(agent_sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=only_agents, sem="relaxed")
            alone = stays & (agent_slot >= D)
            tl.store(agents_ptr + (b * num_agents + agent_slot[:, None]) * C + cols[None, :], x, mask=alone[:, None] & col_ok[None, :])

    @triton.jit
    def _destination_mean_kernel(
        x_ptr, index_ptr, sums_ptr, merged_ptr, agents_ptr,
        D, C, num_slots, num_agents, sums_width, stride_xb, stride_xn,
        HAS_AGENTS: tl.constexpr, SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Each destination slot: (own value + sum of its merged sources) / (1 + their count). Each
        program reads its destinations' sums once and then zeroes them for the plan's next merge
        (cross-attention, feed-forward)."""
        b = tl.program_id(1)
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = d < D
        token = tl.load(index_ptr + d, mask=ok, other=0)
        sums = sums_ptr + (b * D + d) * sums_width
        count = 1 + tl.load(sums + C, mask=ok, other=0)
        if HAS_AGENTS:
            agent_count = count + tl.load(sums + 2 * C + 1, mask=ok, other=0)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = ok[:, None] & (cols[None, :] < C)
            at = sums[:, None] + cols[None, :]
            own = tl.load(x_ptr + b * stride_xb + token[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
            total = (own.to(tl.float32) * SCALE).to(tl.int64) + tl.load(at, mask=mask, other=0)
            mean = total.to(tl.float32) * (1.0 / SCALE) / count[:, None].to(tl.float32)
            tl.store(merged_ptr + (b * num_slots + d[:, None]) * C + cols[None, :], mean.to(merged_ptr.dtype.element_ty), mask=mask)
            if HAS_AGENTS:
                total += tl.load(at + C + 1, mask=mask, other=0)
                mean = total.to(tl.float32) * (1.0 / SCALE) / agent_count[:, None].to(tl.float32)
                tl.store(agents_ptr + (b * num_agents + d[:, None]) * C + cols[None, :], mean.to(agents_ptr.dtype.element_ty), mask=mask)
        # Threads hold copies of the counts: all have read before any zeroes (no order between threads otherwise).
        tl.debug_barrier()
        _zero_rows(sums, ok, sums_width, BLOCK_D, BLOCK_C)

    @triton.jit
    def _unmerge_kernel(
        y_ptr, slot_ptr, residual_ptr, out_ptr, N, C, stride_yb, stride_ys, stride_yc, stride_rb, stride_rn, stride_rc,
        RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """out (B, N, C): every token the row of its slot in y (B, S, C), plus its row of the residual
        (as torch adds: in float32, rounded once to y's dtype)."""
        b = tl.program_id(2)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = tokens < N
        mask = ok[:, None] & (cols[None, :] < C)
        slot = tl.load(slot_ptr + b * N + tokens, mask=ok, other=0)
        v = tl.load(y_ptr + b * stride_yb + slot[:, None] * stride_ys + cols[None, :] * stride_yc, mask=mask)
        if RESIDUAL:
            r = tl.load(residual_ptr + b * stride_rb + tokens[:, None] * stride_rn + cols[None, :] * stride_rc, mask=mask)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(v.dtype)
        tl.store(out_ptr + (b * N + tokens[:, None]) * C + cols[None, :], v, mask=mask)

# triton.cdiv and triton.next_power_of_2 are constexpr functions: ~1 us of host time per call
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


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
    """A block's merge plan as the kernels keep it: all its parts in one workspace (_layout), so
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
        return _views(self.workspace, _layout(self.shape, self.workspace.device))


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


_TOKEN_BLOCK = 1024 if not INTERPRET else 64  # tokens per program of the kernels over token positions
_HISTOGRAM = 5 * 2048 + 3  # int32 per batch row for the radix passes: B x 5 x 2048 histograms, then B x 3 done counters


@functools.cache
def _layout(shape: PlanShape, device: torch.device) -> Layout:
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
        d_per_split = _cdiv(_cdiv(num_dst, _destination_splits(batch, n_tokens, num_dst, device)), SPLIT_ALIGN) * SPLIT_ALIGN
        splits = _cdiv(num_dst, d_per_split)
    if splits > 1:  # each split writes its part; one more launch combines them
        parts["part_score"] = (torch.float32, (splits, batch, n_tokens))
        parts["part_best"] = (torch.int32, (splits, batch, n_tokens))
    radix_programs = 0 if n_tokens <= min(ONE_PROGRAM_MAX_TOKENS, 2**15 - 1) else _cdiv(n_tokens, _TOKEN_BLOCK)
    # zeroed by the prologue: the radix passes' histograms and done counters, or per batch row the
    # matching's count of finished programs
    parts["counters"] = (torch.int32, (batch, _HISTOGRAM if radix_programs else 1))
    if radix_programs:
        parts["threshold"] = (torch.int64, (batch, 2, 2))
        parts["below"] = (torch.int32, (batch, 2, radix_programs, 2))
    placed, size = {}, 0
    for name, (dtype, part_shape) in parts.items():
        placed[name] = (size, dtype, part_shape)
        size += _cdiv(math.prod(part_shape) * dtype.itemsize, 128) * 128
    return Layout(placed, size, resident, splits, d_per_split, radix_programs)


def _views(workspace: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {
        name: workspace[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (offset, dtype, shape) in layout.parts.items()
    }


def plan(x, width: int, sy: int, sx: int, downsample: int, num_merged: int, num_agent_merged: int | None,
         key: int | None = None, seed: int = 0, timestep: torch.Tensor | None = None) -> Plan:  # fmt: skip
    """Steps 1-4 for a block whose metric is x (B, N, C) on a grid `width` tokens wide (see
    merge.plan_block): destinations random from an int `key`, or from the key of (seed, timestep)
    with a timestep tensor, else top-left."""
    (workspace,) = _plan(x, width, sy, sx, downsample, key, seed, timestep, num_merged, num_agent_merged)
    return Plan(workspace, PlanShape(*x.shape, x.dtype, width, sy, sx, num_merged, num_agent_merged))


def merge(x: torch.Tensor, plan: Plan, with_agents: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (B, N, C) -> the merged sequence (B, N - t, C) and, with_agents, the agents (B, N - t_a, C)."""
    return _merge(x, plan.workspace, *plan.shape[1:], with_agents)


def unmerge(y: torch.Tensor, plan: Plan, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, N - t, C') -> (B, N, C'): every token the row of its slot, plus `residual` (B, N, C') if given."""
    return _unmerge(y, plan.workspace, residual, *plan.shape[1:])[0]


def _plan(x, width, sy, sx, downsample, key, seed, timestep, num_merged, num_agent_merged):
    shape = PlanShape(*x.shape, x.dtype, width, sy, sx, num_merged, num_agent_merged)
    layout = _layout(shape, x.device)
    workspace = torch.empty(layout.size, dtype=torch.uint8, device=x.device)
    mode = 2 if key is not None else 1 if timestep is not None else 0
    if layout.resident is None and x.stride(-1) != 1:
        x = x.contiguous()  # the looped matching reads its rows again for every destination tile
    _plan_launches(x, workspace, shape, layout, downsample, mode, key, seed, timestep)
    return (workspace,)


def _plan_launches(x, workspace, shape: PlanShape, layout: Layout, downsample, mode, key, seed, timestep):
    parts = _views(workspace, layout)
    batch, n_tokens, channels = x.shape
    cell, sums, counters = parts["token_cell"], parts["sums"], parts["counters"]
    rest = max(n_tokens - shape.num_dst * shape.sy * shape.sx, counters.shape[1])
    block_d = 8  # cells per program: enough programs to zero the sums (2.6 MB per block at 512px, agent stage)
    _prologue_kernel[(_cdiv(shape.num_dst, block_d) + _cdiv(rest, _TOKEN_BLOCK), batch)](
        x, timestep if mode == 1 else cell, seed & 0xFFFFFFFF, key if mode == 2 else 0,
        cell, parts["dst_index"], parts["dst_unit"], parts["score"], parts["best"], sums,
        counters, n_tokens, channels, shape.width, downsample, sums.shape[-1], counters.shape[1], *x.stride(),
        SY=shape.sy, SX=shape.sx, KEY=mode, CELL=_next_power_of_2(shape.sy * shape.sx),
        BLOCK_D=block_d, BLOCK_C=min(64, max(16, _next_power_of_2(channels))), BLOCK_REST=_TOKEN_BLOCK,
    )  # fmt: skip
    if not _matching(x, parts, shape, layout):
        _selection(parts, shape, layout)


def _matching(x, parts: dict, shape: PlanShape, layout: Layout) -> bool:
    """score and best of every source (step 2): its cosine similarity to its best destination.
    Whether the matching's last programs also selected the slots."""
    batch, n_tokens, channels = x.shape
    num_dst, dst_unit = shape.num_dst, parts["dst_unit"]
    dst_strides = (dst_unit.stride(0), dst_unit.stride(1))
    flags = dict(SY=shape.sy, SX=shape.sx, IEEE=x.dtype == torch.float32)
    if layout.resident is not None:  # SD 1.x block inputs come channels-last (stride(-1) = N): read them in place
        c_a, c_b, c_rest = layout.resident
        grid = lambda meta: (_cdiv(n_tokens - num_dst, meta["BLOCK_M"]), batch)  # noqa: E731
        has_agents = shape.num_agent_merged is not None
        args = (x, dst_unit, parts["dst_index"], parts["score"], parts["best"], parts["token_cell"], parts["slot"],
                parts.get("agent_slot", parts["slot"]), parts["counters"], n_tokens, num_dst, shape.width,
                shape.num_merged, shape.num_agent_merged or 0)  # fmt: skip
        args += (*x.stride(), *dst_strides)
        meta = dict(**flags, C_A=c_a, C_B=c_b, C_REST=c_rest, HAS_AGENTS=has_agents, SELECT_BLOCK=_next_power_of_2(n_tokens))
        config = _matching_config(_best_destination_resident_kernel, grid, x, num_dst, *args, **meta, SELECT=False)
        # The selection's sequential steps want 8 warps or more (its own kernel's): with 4 a
        # ToMe-stage plan at 512px took 70 us of GPU time against 53 us in two launches (H100). The
        # interpreter selects there whatever the warps, so that the CPU tests run it.
        select = layout.can_select_in_matching and (INTERPRET or config.num_warps >= 8)
        _launch_matching(_best_destination_resident_kernel, grid, x, num_dst, *args, **meta, SELECT=select, config=config)
        return select
    splits = layout.splits
    score, best = (parts["part_score"], parts["part_best"]) if splits > 1 else (parts["score"], parts["best"])
    grid = lambda meta: (_cdiv(n_tokens - num_dst, meta["BLOCK_M"]), batch, splits)  # noqa: E731
    args = (x, dst_unit, parts["dst_index"], score, best, n_tokens, num_dst)
    _launch_matching(_best_destination_kernel, grid, x, num_dst, *args, channels, shape.width, *x.stride()[:2],
                     *dst_strides, layout.d_per_split, **flags, BLOCK_C=min(64, max(16, _next_power_of_2(channels))))  # fmt: skip
    if splits > 1:
        _combine_splits_kernel[(_cdiv(n_tokens - num_dst, _TOKEN_BLOCK), batch)](
            score, best, parts["dst_index"], parts["score"], parts["best"], n_tokens, num_dst, shape.width, splits,
            SY=shape.sy, SX=shape.sx, BLOCK=_TOKEN_BLOCK,
        )  # fmt: skip
    return False


def _selection(parts: dict, shape: PlanShape, layout: Layout) -> None:
    """slot and agent_slot of every token (steps 3-4): the t best-scoring sources join their best
    destination (see merge.assign_slots)."""
    score, best, cell, slot = parts["score"], parts["best"], parts["token_cell"], parts["slot"]
    batch, n_tokens = score.shape
    has_agents = shape.num_agent_merged is not None
    agent_slot = parts.get("agent_slot", slot)
    counts = (shape.num_merged, shape.num_agent_merged or 0)
    if not layout.radix_programs:
        _one_program_slots_kernel[(batch,)](
            score, best, cell, slot, agent_slot, n_tokens, shape.num_dst, *counts,
            HAS_AGENTS=has_agents, BLOCK=_next_power_of_2(n_tokens), num_warps=8,
        )  # fmt: skip
        return
    programs, threshold, below = layout.radix_programs, parts["threshold"], parts["below"]
    hist, done = parts["counters"].view(-1).split([batch * 5 * 2048, batch * 3])
    for radix_pass in range(3):
        _histogram_kernel[(programs, batch)](
            score, hist, done, threshold, n_tokens, *counts, PASS=radix_pass, HAS_AGENTS=has_agents, BLOCK=_TOKEN_BLOCK,
        )  # fmt: skip
    _below_counts_kernel[(programs, batch)](score, cell, threshold, below, n_tokens, HAS_AGENTS=has_agents, BLOCK=_TOKEN_BLOCK)
    _slots_kernel[(programs, batch)](
        score, best, cell, threshold, below, slot, agent_slot, n_tokens, shape.num_dst,
        HAS_AGENTS=has_agents, BLOCK=_TOKEN_BLOCK, MAX_PROGRAMS=_next_power_of_2(programs),
    )  # fmt: skip


# 2**24 steps per unit: fp16's largest value summed over 65536 tokens stays inside int64 (7e16 < 9e18)
_FIXED_POINT = float(2**24)


def _merge(x, workspace, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged, with_agents):
    """The merged sequence and the agents (or None) in one pass over x: each slot the mean of its
    tokens, deterministic. Destinations hold slots 0..D-1 in both plans."""
    shape = PlanShape(x.shape[0], num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged)
    if x.shape[1:] != (num_tokens, channels):
        raise ValueError(f"merge: x of shape {tuple(x.shape)} does not fit a plan of {num_tokens} tokens x {channels} channels")
    layout = _layout(shape, x.device)
    batch = x.shape[0]
    num_slots = num_tokens - num_merged
    num_agents = num_tokens - num_agent_merged if with_agents else None
    merged = torch.empty(batch, num_slots, channels, device=x.device, dtype=x.dtype)
    agents = torch.empty(batch, num_agents, channels, device=x.device, dtype=x.dtype) if with_agents else merged
    if x.stride(-1) != 1:
        x = x.contiguous()
    _merge_launches(x, workspace, shape, layout, merged, agents, with_agents)
    return merged, (agents if with_agents else None)


def _merge_launches(x, workspace, shape: PlanShape, layout: Layout, merged, agents, with_agents: bool):
    parts = _views(workspace, layout)
    batch, n_tokens, channels = x.shape
    sums, num_dst = parts["sums"], shape.num_dst
    slot = parts["slot"]
    block_t, block_c = (32, 64) if not INTERPRET else (16, 16)
    _scatter_kernel[(_cdiv(n_tokens, block_t), _cdiv(channels, block_c), batch)](
        x, slot, parts["agent_slot"] if with_agents else slot, parts["token_cell"], merged, agents, sums,
        n_tokens, channels, num_dst, merged.shape[1], agents.shape[1], sums.shape[-1], x.stride(0), x.stride(1),
        HAS_AGENTS=with_agents, SCALE=_FIXED_POINT, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    # 4 destinations per program: enough programs for the few destinations of the agent stage (256 at
    # 4096 tokens): merge 45 -> 40 us at SDXL 1024px level 2, ToMe stage 26 -> 20 us (16 before; H100)
    block_d = 4
    _destination_mean_kernel[(_cdiv(num_dst, block_d), batch)](
        x, parts["dst_index"], sums, merged, agents, num_dst, channels, merged.shape[1], agents.shape[1], sums.shape[-1],
        x.stride(0), x.stride(1), HAS_AGENTS=with_agents, SCALE=_FIXED_POINT, BLOCK_D=block_d, BLOCK_C=block_c,
    )  # fmt: skip


def _unmerge(y, workspace, residual, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged):
    shape = PlanShape(y.shape[0], num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged)
    layout = _layout(shape, y.device)
    batch, _, out_channels = y.shape
    out = torch.empty(batch, num_tokens, out_channels, device=y.device, dtype=y.dtype)
    block_t, block_c = (32, 64) if not INTERPRET else (16, 16)
    if residual is not None and (residual.shape != out.shape or residual.dtype != y.dtype):
        raise ValueError(f"unmerge: a residual of {tuple(residual.shape)} {residual.dtype} for an output of {tuple(out.shape)} {y.dtype}")
    added = out if residual is None else residual  # read only with a residual
    _unmerge_kernel[(_cdiv(num_tokens, block_t), _cdiv(out_channels, block_c), batch)](
        y, _views(workspace, layout)["slot"], added, out, num_tokens, out_channels, *y.stride(), *added.stride(),
        RESIDUAL=residual is not None, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    return (out,)


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


# Destinations of one split of the looped matching: whole tiles of its largest BLOCK_D
SPLIT_ALIGN = max(c.kwargs["BLOCK_D"] for c in _best_destination_kernel.configs) if triton is not None else 0


def _destination_splits(batch: int, n_tokens: int, num_dst: int, device) -> int:
    """Into how many parts the looped matching splits the destinations: with few rows the GPU is not
    filled (SDXL 1024px, level 2: 48 programs of 128 rows on an H100's 132 SMs)."""
    if INTERPRET:
        return 1
    programs = _cdiv(n_tokens - num_dst, 128) * batch
    return max(1, min(_cdiv(_multiprocessors(device), programs), num_dst // SPLIT_ALIGN))


_matching_configs_found = {}  # (kernel, N, D, C, dtype): the config its autotuner chose


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
            config = _autotune(tuned, grid, args, meta)
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


# Up to this many tokens (SD 512px, SDXL 1024px) one program per batch row selects and assigns the
# slots: one launch instead of the radix selection's five, and less GPU time too (H100, batch 2,
# 4096 tokens, whole plans: 41.6 / 44.8 us against 54.4 / 54.5 us, agent / ToMe stage). At 9216 tokens
# its plans take 1.8x / 2.3x the radix selection's (scripts/results/2026-11-24-h100/kernel_benchmark_fc7256c.txt).
ONE_PROGRAM_MAX_TOKENS = 4096


# The ops are defined with torch.library.define / impl, not torch.library.custom_op, whose Python
# wrappers (autograd and checks at every call, pytorch/pytorch#139500) cost a compiled call in the
# default mode, bound by the host, 60-90 us of host time per op (SDXL 1024 on an H100 host,
# scripts/results/2026-11-24-h100/custom_op_ab.txt).
_library = torch.library.Library("agentsd", "DEF")


def _compilable(schema: str, launch, fake, outputs: int, device_at: int = 0):
    """`launch` as it is in eager calls and CUDA graphs; under torch.compile a custom op, which dynamo
    records as one opaque call with `fake`'s output shapes and which runs `launch` at run time
    (dynamo cannot trace Triton's autotuner). The op returns a list: the `outputs` results of
    `launch` without its trailing Nones, put back here. Eager calls skip the dispatcher's host time
    and run on the device of argument `device_at` (a tensor or a device)."""
    name = schema.partition("(")[0]

    def on_device(*args, **kwargs):
        return _run_on(_device_index(args[device_at]), launch, args, kwargs)

    _library.define(schema)
    # every backend (CUDA; the CPU under Triton's interpreter in the tests); no autograd kernel:
    # the merge has no gradient, and the dispatcher's own fallback costs no Python
    _library.impl(name, _without_none(on_device), "CompositeExplicitAutograd")
    torch.library.register_fake(f"agentsd::{name}", _without_none(fake), lib=_library)
    return _eager_or_op(launch, on_device, getattr(torch.ops.agentsd, name).default, outputs)


def _without_none(fn):
    """fn with its results as a list without the Nones: an op's Tensor[]."""
    return lambda *args: [t for t in fn(*args) if t is not None]


def _eager_or_op(launch, on_device, op, outputs: int):
    """on_device in eager calls; under torch.compile `op` on launch's arguments (defaults filled in),
    its list of results padded back to `outputs` with Nones."""
    signature = inspect.signature(launch)

    @functools.wraps(launch)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return on_device(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = op(*bound.args)
        return (*out, *[None] * (outputs - len(out)))

    return call


def _run_on(device: int, fn, args: tuple, kwargs: dict):
    """fn(*args, **kwargs) with CUDA device `device` current (-1: as it is). Triton launches on the
    current device, not on its tensors' (a pipeline moved to cuda:1 leaves the current device at 0)."""
    if device < 0 or device == torch._C._cuda_getDevice():
        return fn(*args, **kwargs)
    with torch.cuda.device(device):
        return fn(*args, **kwargs)


def _device_index(x) -> int:
    """The CUDA device index of a tensor or device; -1 for the CPU or the current device ("cuda")."""
    if isinstance(x, torch.Tensor):
        return x.get_device()
    index = torch.device(x).index
    return -1 if index is None else index


def _fake_plan(x, width, sy, sx, downsample, key, seed, timestep, num_merged, num_agent_merged):
    shape = PlanShape(*x.shape, x.dtype, width, sy, sx, num_merged, num_agent_merged)
    return (x.new_empty(_layout(shape, x.device).size, dtype=torch.uint8),)


def _fake_merge(x, workspace, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged, with_agents):
    batch = x.shape[0]
    agents = x.new_empty(batch, num_tokens - num_agent_merged, channels) if with_agents else None
    return x.new_empty(batch, num_tokens - num_merged, channels), agents


def _fake_unmerge(y, workspace, residual, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged):
    return (y.new_empty(y.shape[0], num_tokens, y.shape[2]),)


_PLAN_SHAPE = "int num_tokens, int channels, ScalarType dtype, int width, int sy, int sx, int num_merged, int? num_agent_merged"
_plan = _compilable(
    "plan(Tensor x, int width, int sy, int sx, int downsample, int? key, int seed, Tensor? timestep, int num_merged, int? num_agent_merged) -> Tensor[]",
    _plan, _fake_plan, outputs=1,
)  # fmt: skip
_merge = _compilable(f"merge(Tensor x, Tensor workspace, {_PLAN_SHAPE}, bool with_agents) -> Tensor[]", _merge, _fake_merge, outputs=2)
_unmerge = _compilable(f"unmerge(Tensor y, Tensor workspace, Tensor? residual, {_PLAN_SHAPE}) -> Tensor[]", _unmerge, _fake_unmerge, outputs=1)
