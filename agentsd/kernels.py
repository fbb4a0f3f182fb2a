"""Triton kernels of the merge plan and the merge, used on CUDA; merge.py's torch code is their reference.

Per block and call:
- destinations: the block's destination pattern, from the call's timestep tensor, in one launch;
- best_destination: the cosine similarity of every source to every destination, reduced to the
  best one as it goes: the (B, N - D, D) similarity matrix is never written (1 GB per block at
  2048px). Where they fit, a program's rows are loaded once and stay resident as the MMA's first
  operand, in registers or partly in shared memory (SD 1.x and 2.x level 1). A launch before
  gathers and normalises the destinations and gives them the score -inf;
- assign_slots: which sources merge (the t best scores), by a selection of the t-th score (no
  sort): one program per batch row up to 4096 tokens, else a radix selection in six launches;
- merge_mean: the merged sequence and the agents in one pass over x. Unmerged tokens are copied;
  merged sources are summed into their destination with atomics on 64-bit fixed point: integer
  addition does not depend on the order of the atomics, so results are deterministic (float atomics
  are not). The agents reuse the sums of the first plan (its merged sources are theirs too). The
  atomics are relaxed: nothing orders them (acq_rel, Triton's default, made the merge 2-3x slower).

Under torch.compile each of these four launchers runs as a custom op (`torch.ops.agentsd.*`).
"""

import functools
import inspect
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
        right = tl.maximum(W - cells_x * SX, 1)
        right_count = cells_y * SY * (W - cells_x * SX)
        right_token = (rest // right) * W + cells_x * SX + rest % right
        below_token = cells_y * SY * W + rest - right_count
        return tl.where(in_cells, cell_token, tl.where(rest < right_count, right_token, below_token))

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
        tl.store(best_ptr + b * N + tokens, best.to(tl.int64), mask=row_ok)

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
        x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr,
        N, D, W, stride_xb, stride_xn, stride_xc, stride_db, stride_dd,
        SY: tl.constexpr, SX: tl.constexpr, IEEE: tl.constexpr,
        C_A: tl.constexpr, C_B: tl.constexpr, C_REST: tl.constexpr,
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
        (bm256.md; both in scripts/results/2026-11-24-h100/)."""
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

    # Selection of the t best-scoring sources without a sort. Token order in the merged sequence is
    # free (ALGORITHM.md), so the unmerged sources take slots D, D+1, ... in token order, and only the
    # set of the t best (ties: lower index first) is needed: the t-th score is found by a radix
    # selection over its 32 bits in three histogram passes (11, 11, 10 bits). Each pass is a launch
    # over all tokens whose last program to finish reads the histogram and leaves the bits found so
    # far in `threshold`; two more launches count and assign. Up to ONE_PROGRAM_MAX_TOKENS one
    # program per batch row holds all tokens and does everything by a bitwise search (one launch).

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
    def _selection_keys(score_ptr, is_dst_ptr, b, p, ok, N):
        """Order keys of tokens p and which of them are sources."""
        source = ok & (tl.load(is_dst_ptr + p, mask=ok, other=1) == 0)
        return _order_key(tl.load(score_ptr + b * N + p, mask=ok, other=0.0)), source

    @triton.jit
    def _slots(key, source, best, own_slot, threshold, equal_wanted, equal_before, below_before, D):
        """Slots of a block of tokens. Sources above the threshold key, and the first `equal_wanted`
        sources equal to it, join their best destination; the other sources take D + (unmerged
        sources before them in token order); destinations keep their cell's slot. equal_before and
        below_before: sources equal to / below the threshold in earlier blocks of the row."""
        equal = source & (key == threshold)
        equal_rank = equal_before + tl.cumsum(equal.to(tl.int64), 0) - equal
        merged = source & ((key > threshold) | (equal & (equal_rank < equal_wanted)))
        unmerged = source & ~merged
        unmerged_rank = below_before + tl.maximum(equal_before - equal_wanted, 0) + tl.cumsum(unmerged.to(tl.int64), 0) - unmerged
        return tl.where(source, tl.where(merged, best, D + unmerged_rank), own_slot)

    @triton.jit
    def _one_program_slots_kernel(
        score_ptr, best_ptr, is_dst_ptr, dst_slot_ptr, slot_ptr, agent_slot_ptr, N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The selection and slots of one batch row in one program, all N (< 2**15) keys in registers.

        The k-th largest key is decided bit by bit from the top: a bit is set when at least k keys
        reach the bits so far with it set. 32 counts, whatever the scores (histograms of the UNet's
        scores, which crowd into a few bins, serialise on their atomics). Both targets are counted
        in one sum: the merged plan's count in the low 16 bits, the agents' above.
        """
        b = tl.program_id(0)
        p = tl.arange(0, BLOCK)
        ok = p < N
        key, source = _selection_keys(score_ptr, is_dst_ptr, b, p, ok, N)
        key = tl.where(ok, key, -1)  # padding reaches no threshold
        merged_key = tl.zeros([], dtype=tl.int64)
        agent_key = tl.zeros([], dtype=tl.int64)
        for bit in tl.static_range(31, -1, -1):
            merged_try, agent_try = merged_key | (1 << bit), agent_key | (1 << bit)
            reaching = tl.sum((key >= merged_try).to(tl.int32) + ((key >= agent_try).to(tl.int32) << 16), 0)
            merged_key = tl.where((reaching & 0xFFFF) >= num_merged, merged_try, merged_key)
            agent_key = tl.where((reaching >> 16) >= num_agent_merged, agent_try, agent_key)
        above = tl.sum((key > merged_key).to(tl.int32) + ((key > agent_key).to(tl.int32) << 16), 0)
        best = tl.load(best_ptr + b * N + p, mask=ok, other=0)
        own_slot = tl.load(dst_slot_ptr + p, mask=ok, other=0)
        slot = _slots(key, source, best, own_slot, merged_key, num_merged - (above & 0xFFFF), 0, 0, D)
        tl.store(slot_ptr + b * N + p, slot, mask=ok)
        if HAS_AGENTS:
            slot = _slots(key, source, best, own_slot, agent_key, num_agent_merged - (above >> 16), 0, 0, D)
            tl.store(agent_slot_ptr + b * N + p, slot, mask=ok)

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
                k = (num_merged if target == 0 else num_agent_merged).to(tl.int64)
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
        score_ptr, is_dst_ptr, threshold_ptr, counts_ptr, N, HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Per target and block of tokens: the sources equal to the threshold key and below it."""
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key, source = _selection_keys(score_ptr, is_dst_ptr, b, p, p < N, N)
        for target in tl.static_range(1 + HAS_AGENTS):
            threshold = tl.load(threshold_ptr + (b * 2 + target) * 2)
            out = counts_ptr + ((b * 2 + target) * tl.num_programs(0) + tl.program_id(0)) * 2
            tl.store(out, tl.sum((source & (key == threshold)).to(tl.int32), 0))
            tl.store(out + 1, tl.sum((source & (key < threshold)).to(tl.int32), 0))

    @triton.jit
    def _slots_kernel(
        score_ptr, best_ptr, is_dst_ptr, dst_slot_ptr, threshold_ptr, counts_ptr, slot_ptr, agent_slot_ptr, N, D,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    ):  # fmt: skip
        """_slots for a block of tokens, after the counts of the earlier blocks."""
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < N
        best = tl.load(best_ptr + b * N + p, mask=ok, other=0)
        own_slot = tl.load(dst_slot_ptr + p, mask=ok, other=0)
        key, source = _selection_keys(score_ptr, is_dst_ptr, b, p, ok, N)
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
    def _unit_destinations_kernel(
        x_ptr, index_ptr, out_ptr, score_ptr, best_ptr, N, D, C, stride_xb, stride_xn, stride_xc,
        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """out (B, D, C) = the destination rows of x, L2-normalised (in float32, stored in x's dtype);
        at the destinations' positions, score -inf (never merged) and best = their own cell."""
        b = tl.program_id(1)
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = d < D
        token = tl.load(index_ptr + d, mask=ok, other=0)
        tl.store(score_ptr + b * N + token, tl.full([BLOCK_D], float("-inf"), tl.float32), mask=ok)
        tl.store(best_ptr + b * N + token, d.to(tl.int64), mask=ok)
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
        tl.atomic_add(sums[:, None] + cols[None, :], fixed, mask=joins[:, None] & col_ok[None, :], sem="relaxed")
        if tl.program_id(1) == 0:
            tl.atomic_add(sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=joins, sem="relaxed")
        stays = source & (slot >= D)
        tl.store(merged_ptr + (b * num_slots + slot[:, None]) * C + cols[None, :], x, mask=stays[:, None] & col_ok[None, :])
        if HAS_AGENTS:
            agent_slot = tl.load(agent_slot_ptr + b * N + tokens, mask=ok, other=0)
            only_agents = stays & (agent_slot < D)
            agent_sums = sums_ptr + (b * D + agent_slot) * width + C + 1
            tl.atomic_add(agent_sums[:, None] + cols[None, :], fixed, mask=only_agents[:, None] & col_ok[None, :], sem="relaxed")
            if tl.program_id(1) == 0:
                tl.atomic_add(agent_sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=only_agents, sem="relaxed")
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


# triton.cdiv and triton.next_power_of_2 are constexpr functions: ~1 us of host time per call
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


_launchers = {}  # specialization key (_launch) -> launch(grid, args) through Triton's compiled kernel
# From Triton 3.3 on, a compiled kernel's launcher takes the constexprs too (3.0-3.2 drop them from
# its arguments): _launch calls it that way only there.
_DIRECT_LAUNCH = triton is not None and tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 3)


def _launch(fn, grid, *args, **kwargs):
    """fn[grid](*args, **kwargs) for a jit function whose arguments after `args` are all in kwargs.

    Triton binds and specializes every argument again at each launch: 83 us per launch inside an
    eager SD 1.5 512px UNet call on an H100 host, which is bound by the host there. A launch whose
    specialization was seen before goes through the compiled kernel's launcher instead (27 us through
    `compiled[grid]`, scripts/results/2026-11-24-h100/launch_cost.md), with tensors passed as their
    addresses (the launcher then skips a driver query per pointer; launch_direct.md). The key holds
    the device and what Triton specializes on: constexprs and options, each tensor's dtype and
    16-byte alignment, each int's being 1, a multiple of 16 or beyond 32 bits.
    """
    if INTERPRET or not _DIRECT_LAUNCH:
        fn[grid](*args, **kwargs)
        return
    device = torch._C._cuda_getDevice()
    key, values = _launch_key(fn, device, args, kwargs)
    launcher = _launchers.get(key)
    if launcher is None:
        compiled = fn[grid](*args, **kwargs)
        _launchers[key] = _direct_launcher(compiled, device, [kwargs[name] for name in fn.arg_names[len(args):]])
    else:
        launcher((*grid, 1, 1)[:3], values)  # it wants 3 dims


def _launch_key(fn, device: int, args: tuple, kwargs: dict) -> tuple[tuple, list]:
    """(the specialization key of a launch, its arguments with tensors as their addresses)."""
    values, key = [], [fn, device, *kwargs.items()]
    for arg in args:
        if isinstance(arg, torch.Tensor):
            address = arg.data_ptr()
            values.append(address)
            key.append((arg.dtype, address % 16 == 0))
        else:
            values.append(arg)
            key.append((arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31) if type(arg) is int else type(arg))
    return tuple(key), values


def _direct_launcher(compiled, device: int, constexprs: list):
    """launch(grid, args): `compiled[grid](*args, *constexprs)` on the current stream of `device`
    (the current device). Where no profiler listens to launches (Triton's launch hooks, e.g.
    Proton), it calls the launcher itself: Triton's runner would look up the device and stream,
    build launch metadata and call two empty hook chains at every launch."""

    def launch(grid, args):
        if _launch_hooks_idle():
            run(*grid, torch._C._cuda_getCurrentRawStream(device), function, metadata, None, None, None, *args, *constexprs)
        else:
            compiled[grid](*args, *constexprs)

    compiled._init_handles()
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    return launch


# Triton's runtime settings; before Triton 3.4 launch hooks were class attributes of CompiledKernel
_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)


def _launch_hooks_idle() -> bool:
    """Whether no launch hook is set (unknown before Triton 3.4: then not idle)."""
    if _RUNTIME_KNOBS is None:
        return False
    hooks = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
    return all(hook is None or not getattr(hook, "calls", True) for hook in hooks)


def destinations(height: int, width: int, sy: int, sx: int, downsample: int, device, key=None, seed=0, timestep=None):
    """(index (D,), slot (N,), is_dst (N,)) as merge.choose_destinations computes them: random from
    an int `key`, or from the key of (seed, timestep) with a timestep tensor; else top-left."""
    cells_x, num_cells = width // sx, (height // sy) * (width // sx)
    num_tokens = height * width
    index = torch.empty(num_cells, dtype=torch.int64, device=device)
    slot = torch.empty(num_tokens, dtype=torch.int64, device=device)
    is_dst = torch.empty(num_tokens, dtype=torch.bool, device=device)
    mode = 2 if key is not None else 1 if timestep is not None else 0
    block = 1024 if not INTERPRET else 64
    _launch(
        _destinations_kernel, (_cdiv(num_tokens, block),),
        timestep if mode == 1 else index, seed & 0xFFFFFFFF, key if mode == 2 else 0, index, slot, is_dst,
        height, width, cells_x, num_cells, downsample, SY=sy, SX=sx, KEY=mode, BLOCK=block,
    )  # fmt: skip
    return index, slot, is_dst


def _resident_split(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(C_A, C_B, C_REST) for the resident kernel: powers of two up to 128 (C_B and C_REST may be 0)
    that sum to the channels, when a program's rows fit in registers and its smallest candidate's
    destination tiles in shared memory; else None."""
    channels = x.shape[-1]
    # 16 rows per warp in every candidate: a thread holds C/4 registers of fp16 rows (80 at 320)
    if x.element_size() * channels > 768:
        return None
    main = 1 << (channels.bit_length() - 1)
    rest = channels - main
    if main < 16 or (rest and (rest < 16 or rest & (rest - 1))):
        return None  # tl.dot wants tiles of at least 16
    # two stages of 64 destinations: 80 KB at 320 channels in fp16 (H100 227 KB, consumer GPUs ~100)
    if not INTERPRET and x.element_size() * channels * 2 * 64 > _shared_memory(x.device):
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


def best_destination(x: torch.Tensor, dst_index: torch.Tensor, width: int, sy: int, sx: int):
    """x (B, N, C) on a grid `width` tokens wide, destination positions (D,) of its sy x sx cells ->
    cosine score and index of the best destination, (B, N) float32 and int64. Only the sources are
    matched; at a destination the score is -inf and the index its own cell."""
    batch, n_tokens, channels = x.shape
    split = _resident_split(x)
    if split is None and x.stride(-1) != 1:  # the looped kernel reads its rows again for every destination tile
        x = x.contiguous()
    num_dst = dst_index.numel()
    block_c = min(64, max(16, _next_power_of_2(channels)))
    score = torch.empty(batch, n_tokens, device=x.device, dtype=torch.float32)
    best = torch.empty(batch, n_tokens, device=x.device, dtype=torch.int64)
    dst_unit = torch.empty(batch, num_dst, channels, device=x.device, dtype=x.dtype)
    _launch(
        _unit_destinations_kernel, (_cdiv(num_dst, 32), batch),
        x, dst_index, dst_unit, score, best, n_tokens, num_dst, channels, *x.stride(), BLOCK_D=32, BLOCK_C=block_c,
    )  # fmt: skip
    dst_strides = (dst_unit.stride(0), dst_unit.stride(1))
    flags = dict(SY=sy, SX=sx, IEEE=x.dtype == torch.float32)
    if split is not None:  # SD 1.x block inputs come channels-last (stride(-1) = N): read them in place
        grid = lambda meta: (_cdiv(n_tokens - num_dst, meta["BLOCK_M"]), batch)  # noqa: E731
        args = (x, dst_unit, dst_index, score, best, n_tokens, num_dst)
        _launch_matching(_best_destination_resident_kernel, grid, x, num_dst, *args, width, *x.stride(), *dst_strides,
                         **flags, C_A=split[0], C_B=split[1], C_REST=split[2])  # fmt: skip
        return score, best
    splits = _destination_splits(batch, n_tokens, num_dst, x.device)
    d_per_split = _cdiv(_cdiv(num_dst, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = _cdiv(num_dst, d_per_split)
    if splits > 1:  # each split writes its part beside score/best; one more launch combines them
        part_score = torch.empty(splits, batch, n_tokens, device=x.device, dtype=torch.float32)
        part_best = torch.empty(splits, batch, n_tokens, device=x.device, dtype=torch.int64)
    else:
        part_score, part_best = score, best
    grid = lambda meta: (_cdiv(n_tokens - num_dst, meta["BLOCK_M"]), batch, splits)  # noqa: E731
    args = (x, dst_unit, dst_index, part_score, part_best, n_tokens, num_dst)
    _launch_matching(_best_destination_kernel, grid, x, num_dst, *args, channels, width, *x.stride()[:2], *dst_strides,
                     d_per_split, **flags, BLOCK_C=block_c)  # fmt: skip
    if splits > 1:
        block = 1024 if not INTERPRET else 64
        _launch(
            _combine_splits_kernel, (_cdiv(n_tokens - num_dst, block), batch),
            part_score, part_best, dst_index, score, best, n_tokens, num_dst, width, splits, SY=sy, SX=sx, BLOCK=block,
        )  # fmt: skip
    return score, best


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


def _launch_matching(tuned, grid, x, num_dst: int, *args, **meta):
    """Launch a matching kernel (autotune over heuristics over jit). The first launch of an autotuning
    key runs the autotuner; later ones launch the jit function with the config found, without the
    autotuner's and the heuristic's Python, which cost an eager block at 512px (bound by the host)
    about 80 us under cProfile on an H100 host. Both go through _launch."""
    key = (tuned, x.shape[1], num_dst, x.shape[2], x.dtype)
    config = _matching_configs_found.get(key)
    if config is None:
        tuned[grid](*args, **meta)
        _matching_configs_found[key] = tuned.best_config
        return
    even_d = num_dst % config.kwargs["BLOCK_D"] == 0
    _launch(tuned.fn.fn, grid(config.kwargs), *args, **meta, **config.all_kwargs(), EVEN_D=even_d)


# Up to this many tokens (SD 512px, SDXL 1024px) one program per batch row selects and assigns the
# slots: one launch instead of six, and less GPU time too (H100, batch 2, 4096 tokens: 19.5 against
# 36 us, host 30-60 against 200 us). At 9216 tokens its GPU time is 3x that of the six launches
# (scripts/results/2026-11-23-h100/kernels_acd48c4.md).
ONE_PROGRAM_MAX_TOKENS = 4096


def assign_slots(score, best, is_dst, dst_slot, num_dst: int, num_merged: int, num_agent_merged: int | None):
    """score, best (B, N) -> slot (B, N) and agent slot (B, N) or None; see merge.assign_slots."""
    batch, n_tokens = score.shape
    has_agents = num_agent_merged is not None
    slot = torch.empty_like(best)
    agent_slot = torch.empty_like(best) if has_agents else slot
    if n_tokens <= min(ONE_PROGRAM_MAX_TOKENS, 2**15 - 1):  # its counts have 16 bits
        _launch(
            _one_program_slots_kernel, (batch,),
            score, best, is_dst, dst_slot, slot, agent_slot, n_tokens, num_dst, num_merged, num_agent_merged or 0,
            HAS_AGENTS=has_agents, BLOCK=_next_power_of_2(n_tokens), num_warps=8,
        )  # fmt: skip
        return slot, (agent_slot if has_agents else None)
    block = 1024 if not INTERPRET else 64
    programs = _cdiv(n_tokens, block)
    hist_and_done = torch.zeros(batch * (5 * 2048 + 3), device=score.device, dtype=torch.int32)  # one memset
    hist, done = hist_and_done.split([batch * 5 * 2048, batch * 3])
    threshold = torch.empty(batch, 2, 2, device=score.device, dtype=torch.int64)
    for radix_pass in range(3):
        _launch(
            _histogram_kernel, (programs, batch),
            score, hist, done, threshold, n_tokens, num_merged, num_agent_merged or 0,
            PASS=radix_pass, HAS_AGENTS=has_agents, BLOCK=block,
        )  # fmt: skip
    below = torch.empty(batch, 2, programs, 2, device=score.device, dtype=torch.int32)
    _launch(_below_counts_kernel, (programs, batch), score, is_dst, threshold, below, n_tokens, HAS_AGENTS=has_agents, BLOCK=block)
    _launch(
        _slots_kernel, (programs, batch),
        score, best, is_dst, dst_slot, threshold, below, slot, agent_slot, n_tokens, num_dst,
        HAS_AGENTS=has_agents, BLOCK=block, MAX_PROGRAMS=_next_power_of_2(programs),
    )  # fmt: skip
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
    _launch(
        _scatter_kernel, (_cdiv(n_tokens, block_t), _cdiv(channels, block_c), batch),
        x, slot, agent_slot if has_agents else slot, is_dst, merged, agents, sums,
        n_tokens, channels, num_dst, num_slots, num_agents or 0, x.stride(0), x.stride(1),
        HAS_AGENTS=has_agents, SCALE=_FIXED_POINT, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    _launch(
        _destination_mean_kernel, (_cdiv(num_dst, block_t), _cdiv(channels, block_c), batch),
        x, dst_index, sums, merged, agents, num_dst, channels, num_slots, num_agents or 0, x.stride(0), x.stride(1),
        HAS_AGENTS=has_agents, SCALE=_FIXED_POINT, BLOCK_D=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    return merged, (agents if has_agents else None)


def _compilable(schema: str, launch, fake, outputs: int, device_at: int = 0):
    """`launch` as it is in eager calls and CUDA graphs; under torch.compile a custom op, which dynamo
    records as one opaque call with `fake`'s output shapes and which runs `launch` at run time
    (dynamo cannot trace Triton's autotuner). The op returns a list: the `outputs` results of
    `launch` without its trailing Nones, put back here. Eager calls skip the dispatcher's host time
    and run on the device of argument `device_at` (a tensor or a device)."""
    name, _, arguments = schema.partition("(")

    def on_device(*args, **kwargs):
        return _run_on(_device_index(args[device_at]), launch, args, kwargs)

    without_none = lambda fn: lambda *args: [t for t in fn(*args) if t is not None]  # noqa: E731
    op = torch.library.custom_op(f"agentsd::{name}", without_none(on_device), mutates_args=(), schema=f"({arguments}")
    op.register_fake(without_none(fake))
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


def _fake_destinations(height, width, sy, sx, downsample, device, key, seed, timestep):
    num_tokens = height * width
    index = torch.empty((height // sy) * (width // sx), dtype=torch.int64, device=device)
    return index, index.new_empty(num_tokens), torch.empty(num_tokens, dtype=torch.bool, device=device)


def _fake_best_destination(x, dst_index, width, sy, sx):
    return x.new_empty(x.shape[:2], dtype=torch.float32), x.new_empty(x.shape[:2], dtype=torch.int64)


def _fake_assign_slots(score, best, is_dst, dst_slot, num_dst, num_merged, num_agent_merged):
    return torch.empty_like(best), None if num_agent_merged is None else torch.empty_like(best)


def _fake_merge_mean(x, slot, agent_slot, dst_index, is_dst, num_slots, num_agents):
    batch, _, channels = x.shape
    agents = None if num_agents is None else x.new_empty(batch, num_agents, channels)
    return x.new_empty(batch, num_slots, channels), agents


destinations = _compilable(
    "destinations(int height, int width, int sy, int sx, int downsample, Device device, int? key, int seed, Tensor? timestep) -> Tensor[]",
    destinations, _fake_destinations, outputs=3, device_at=5,
)  # fmt: skip
best_destination = _compilable(
    "best_destination(Tensor x, Tensor dst_index, int width, int sy, int sx) -> Tensor[]",
    best_destination, _fake_best_destination, outputs=2,
)  # fmt: skip
assign_slots = _compilable(
    "assign_slots(Tensor score, Tensor best, Tensor is_dst, Tensor dst_slot, int num_dst, int num_merged, int? num_agent_merged) -> Tensor[]",
    assign_slots, _fake_assign_slots, outputs=2,
)  # fmt: skip
merge_mean = _compilable(
    "merge_mean(Tensor x, Tensor slot, Tensor? agent_slot, Tensor dst_index, Tensor is_dst, int num_slots, int? num_agents) -> Tensor[]",
    merge_mean, _fake_merge_mean, outputs=2,
)  # fmt: skip
