"""The unmerge phase on the GPU: every token the row of its slot in the merged sequence, plus the
block's residual where lean_forward asks (one gather instead of a gather and an add)."""

import torch

from .launch import INTERPRET, cdiv, tl, triton
from .layout import PlanShape, layout_for, views

if triton is not None:

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


def run_unmerge(y, workspace, residual, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged):
    """y (B, N - t, C') -> (B, N, C') by the plan in `workspace` (its shape flattened, as the op
    takes it), plus `residual` (B, N, C') if given."""
    shape = PlanShape(y.shape[0], num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged)
    batch, _, out_channels = y.shape
    out = torch.empty(batch, num_tokens, out_channels, device=y.device, dtype=y.dtype)
    if residual is not None and (residual.shape != out.shape or residual.dtype != y.dtype):
        raise ValueError(f"unmerge: a residual of {tuple(residual.shape)} {residual.dtype} for an output of {tuple(out.shape)} {y.dtype}")
    added = out if residual is None else residual  # read only with a residual
    slot = views(workspace, layout_for(shape, y.device))["slot"]
    block_t, block_c = (32, 64) if not INTERPRET else (16, 16)
    _unmerge_kernel[(cdiv(num_tokens, block_t), cdiv(out_channels, block_c), batch)](
        y, slot, added, out, num_tokens, out_channels, *y.stride(), *added.stride(),
        RESIDUAL=residual is not None, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    return (out,)
