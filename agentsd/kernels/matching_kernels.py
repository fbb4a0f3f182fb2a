"""Step 2 of a plan on the GPU: the matching kernels. Each source's cosine similarity to every
destination, reduced to its best one as it goes: the (B, N - D, D) similarity matrix is never
written (1 GB per block at 2048px). Where they fit, a program's rows are loaded once and stay
resident as the MMA's first operand, in registers or partly in shared memory (SD 1.x and 2.x level
1: _best_destination_resident_kernel); else the rows are read again for every destination tile,
and the destinations may be split across programs (_best_destination_kernel, then
_combine_splits_kernel). Their autotuning candidates are here; matching.py chooses and launches."""

from .launch import INTERPRET, tl, triton

if triton is not None:
    from .selection import select_row  # the resident matching's last programs may select

    @triton.jit
    def _dot_update(dot, x, d, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(x, d, dot, input_precision="ieee")
        return tl.dot(x, d, dot)

    @triton.jit
    def rest_token(rest, N, W, SY: tl.constexpr, SX: tl.constexpr):
        """Position of the rest-th token outside the complete cells of an N-token grid W wide: those
        right of the cells, row by row, then those below them (sources all; the prologue's too)."""
        cells_x, cells_y = W // SX, N // W // SY
        right = tl.maximum(W - cells_x * SX, 1)
        right_count = cells_y * SY * (W - cells_x * SX)
        right_token = (rest // right) * W + cells_x * SX + rest % right
        return tl.where(rest < right_count, right_token, cells_y * SY * W + rest - right_count)

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
        return tl.where(in_cells, cell_token, rest_token(rest, N, W, SY, SX))

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
        tile in the interpreter (tests force the others through matching._matching_configs_found)."""
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
        (bm256.md; both in docs/results/2026-11-24-h100/).

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
                select_row(score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, b, N, D,
                           num_merged, num_agent_merged, HAS_AGENTS, SELECT_BLOCK)  # fmt: skip


# Destinations of one split of the looped matching: whole tiles of its largest BLOCK_D
SPLIT_ALIGN = max(c.kwargs["BLOCK_D"] for c in _best_destination_kernel.configs) if triton is not None else 0
