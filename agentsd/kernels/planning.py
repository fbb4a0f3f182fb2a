"""The plan phase (steps 1-4) on the GPU, its parts all in one workspace (layout.py): a prologue
launch, then the matching (matching.py) and the selection (selection.py), which the resident
matching's last programs may run themselves.

The prologue: the destination pattern, drawn from the call's timestep tensor; the destinations'
rows L2-normalised, with score -inf; the merge's sums and the selection's counters zeroed."""

import torch

from .launch import TOKEN_BLOCK, cdiv, next_power_of_2, tl, triton
from .layout import PlanShape, layout_for, views
from .matching import match
from .selection import select

if triton is not None:
    from .matching_kernels import rest_token
    from .merging import zero_rows

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
            zero_rows(sums_ptr + (b * num_cells + cell) * sums_width, ok, sums_width, BLOCK_D, BLOCK_C)
        else:
            rest = (tl.program_id(0) - cell_programs) * BLOCK_REST + tl.arange(0, BLOCK_REST)
            if b == 0:
                token = rest_token(rest, N, W, SY, SX)
                tl.store(token_cell_ptr + token, tl.full([BLOCK_REST], -1, tl.int32), mask=rest < N - num_cells * SY * SX)
            tl.store(counters_ptr + b * num_counters + rest, tl.zeros([BLOCK_REST], tl.int32), mask=rest < num_counters)


def run_plan(x, width, sy, sx, downsample, key, seed, timestep, num_merged, num_agent_merged):
    """A plan's workspace for the metric x (B, N, C), as kernels.plan describes its arguments."""
    shape = PlanShape(*x.shape, x.dtype, width, sy, sx, num_merged, num_agent_merged)
    layout = layout_for(shape, x.device)
    workspace = torch.empty(layout.size, dtype=torch.uint8, device=x.device)
    if layout.resident is None and x.stride(-1) != 1:
        x = x.contiguous()  # the looped matching reads its rows again for every destination tile
    parts = views(workspace, layout)
    batch, n_tokens, channels = x.shape
    cell, sums, counters = parts["token_cell"], parts["sums"], parts["counters"]
    mode = 2 if key is not None else 1 if timestep is not None else 0  # the prologue kernel's KEY
    rest = max(n_tokens - shape.num_dst * shape.sy * shape.sx, counters.shape[1])
    block_d = 8  # cells per program: enough programs to zero the sums (2.6 MB per block at 512px, agent stage)
    _prologue_kernel[(cdiv(shape.num_dst, block_d) + cdiv(rest, TOKEN_BLOCK), batch)](
        x, timestep if mode == 1 else cell, seed & 0xFFFFFFFF, key if mode == 2 else 0,
        cell, parts["dst_index"], parts["dst_unit"], parts["score"], parts["best"], sums,
        counters, n_tokens, channels, shape.width, downsample, sums.shape[-1], counters.shape[1], *x.stride(),
        SY=shape.sy, SX=shape.sx, KEY=mode, CELL=next_power_of_2(shape.sy * shape.sx),
        BLOCK_D=block_d, BLOCK_C=min(64, max(16, next_power_of_2(channels))), BLOCK_REST=TOKEN_BLOCK,
    )  # fmt: skip
    if not match(x, parts, shape, layout):
        select(parts, shape, layout)
    return (workspace,)
