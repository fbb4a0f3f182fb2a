"""Row loads of channels-last inputs along tokens (then transposed) against along channels, in the
resident matching kernel and the destination gather; the L2 flushed before each call (as inside a
UNet) and not. PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/rows_along_tokens.py"""
import torch, triton, triton.language as tl
from agentsd import kernels, merge
from agentsd.kernels import _source_tokens, _store_best
from timing import cuda_graph, median_ms


@triton.jit
def _rows_acc(rows, cols, row_ok, stride_xc, T: tl.constexpr):
    if T:
        x = tl.trans(tl.load(rows[None, :] + cols[:, None] * stride_xc, mask=row_ok[None, :], other=0.0))
    else:
        x = tl.load(rows[:, None] + cols[None, :] * stride_xc, mask=row_ok[:, None], other=0.0)
    identity = (cols[:, None] == cols[None, :]).to(x.dtype)
    return tl.dot(x, identity)


@triton.jit
def _resident(x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr, N, D, W, stride_xb, stride_xn, stride_xc, stride_db, stride_dd,
              SY: tl.constexpr, SX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, T: tl.constexpr):
    b = tl.program_id(1)
    sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = sources < N - D
    tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
    rows = x_ptr + b * stride_xb + tokens * stride_xn
    ca = tl.arange(0, 128)
    cb = 128 + tl.arange(0, 128)
    cr = 256 + tl.arange(0, 64)
    ra = _rows_acc(rows, ca, row_ok, stride_xc, T)
    rb = _rows_acc(rows, cb, row_ok, stride_xc, T)
    rr = _rows_acc(rows, cr, row_ok, stride_xc, T)
    inv = tl.where(row_ok, 1.0 / tl.sqrt(tl.sum(ra * ra, axis=1) + tl.sum(rb * rb, axis=1) + tl.sum(rr * rr, axis=1)), 0.0)
    dt = x_ptr.dtype.element_ty
    ua = (ra * inv[:, None]).to(dt)
    ub = (rb * inv[:, None]).to(dt)
    ur = (rr * inv[:, None]).to(dt)
    dst_base = dst_ptr + b * stride_db
    in_tile = tl.arange(0, BLOCK_D)
    slot_dot = tl.full([BLOCK_M, BLOCK_D], float("-inf"), dtype=tl.float32)
    slot_d0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        dst_cols = dst_base + (d0 + in_tile)[None, :] * stride_dd
        dot = tl.dot(ua, tl.load(dst_cols + ca[:, None]))
        dot = tl.dot(ub, tl.load(dst_cols + cb[:, None]), dot)
        dot = tl.dot(ur, tl.load(dst_cols + cr[:, None]), dot)
        better = dot > slot_dot
        slot_dot = tl.where(better, dot, slot_dot)
        slot_d0 = tl.where(better, d0, slot_d0)
    best_dot = tl.max(slot_dot, axis=1)
    best = tl.min(tl.where(slot_dot == best_dot[:, None], slot_d0 + in_tile[None, :], D), axis=1)
    _store_best(best_dot, best, score_ptr, best_ptr, b, N, tokens, row_ok)


@triton.jit
def _gather(x_ptr, index_ptr, out_ptr, N, D, C, stride_xb, stride_xn, stride_xc, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr):
    """MODE 0: [D, C] tiles (shipped); 1: [C, D] tiles, norms over axis 0, stored through tl.trans;
    2: [C, D] tiles, stored as they are (d fastest)."""
    b = tl.program_id(1)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    token = tl.load(index_ptr + d, mask=ok, other=0)
    rows = x_ptr + b * stride_xb + token * stride_xn
    if MODE == 0:
        sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(rows[:, None] + cols[None, :] * stride_xc, mask=ok[:, None], other=0.0).to(tl.float32)
            sq += tl.sum(v * v, axis=1)
        inv = 1.0 / tl.sqrt(sq)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(rows[:, None] + cols[None, :] * stride_xc, mask=ok[:, None], other=0.0).to(tl.float32) * inv[:, None]
            tl.store(out_ptr + (b * D + d[:, None]) * C + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=ok[:, None])
    else:
        sq = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(rows[None, :] + cols[:, None] * stride_xc, mask=ok[None, :], other=0.0).to(tl.float32)
            sq += tl.sum(v * v, axis=0)
        inv = 1.0 / tl.sqrt(sq)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(rows[None, :] + cols[:, None] * stride_xc, mask=ok[None, :], other=0.0).to(tl.float32) * inv[None, :]
            if MODE == 1:
                tl.store(out_ptr + (b * D + d[:, None]) * C + cols[None, :], tl.trans(v).to(out_ptr.dtype.element_ty), mask=ok[:, None])
            else:
                tl.store(out_ptr + (b * D + d[None, :]) * C + cols[:, None], v.to(out_ptr.dtype.element_ty), mask=ok[None, :])


def timed(fn, flush):
    """us per call, L2 flushed before each call inside the graph, the flush's own time taken off."""
    def with_flush():
        for _ in range(5):
            flush.zero_()
            fn()
    def flush_only():
        for _ in range(5):
            flush.zero_()
    g, f = cuda_graph(with_flush), cuda_graph(flush_only)
    return (median_ms(g.replay, 10) - median_ms(f.replay, 10)) / 5 * 1e3


def main():
    torch.manual_seed(0)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for n, cell in ((65536, 2), (65536, 4), (16384, 2), (4096, 2)):
        side = int(n ** 0.5)
        x = (torch.randn(2, 320, n, device="cuda") * 20).half().transpose(1, 2)
        x = x + 10 * torch.randn(320, device="cuda").half()
        dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
        D = dst.index.numel()
        ref_score, ref_best = kernels.best_destination(x, dst.index, side, cell, cell)
        src = ~torch.isinf(ref_score)
        print(f"N={n} cell={cell} D={D}: shipped best_destination {timed(lambda: kernels.best_destination(x, dst.index, side, cell, cell), flush):.1f} us (flushed)", flush=True)
        unit_ref = torch.nn.functional.normalize(x[:, dst.index].float(), dim=-1).half()
        for mode in (0, 1, 2):
            for bd in (32, 64):
                out = torch.empty_like(unit_ref)
                f = lambda: _gather[(triton.cdiv(D, bd), 2)](x, dst.index, out, n, D, 320, *x.stride(), BLOCK_D=bd, BLOCK_C=64, MODE=mode)
                try:
                    f(); err = (out.float() - unit_ref.float()).abs().max().item()
                    print(f"  gather mode {mode} BLOCK_D {bd}: {timed(f, flush):.1f} us, err {err:.1e}", flush=True)
                except Exception as e:
                    print(f"  gather mode {mode} BLOCK_D {bd}: failed {str(e)[:200]}", flush=True)
        for t in (0, 1):
            for bm, bd, w, st in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 4)):
                score = torch.empty_like(ref_score); best = torch.empty_like(ref_best)
                f = lambda: _resident[(triton.cdiv(n - D, bm), 2)](x, unit_ref, dst.index, score, best, n, D, side, *x.stride(),
                    unit_ref.stride(0), unit_ref.stride(1), SY=cell, SX=cell, BLOCK_M=bm, BLOCK_D=bd, T=bool(t), num_warps=w, num_stages=st)
                try:
                    k = f()
                    same = (best[src] == ref_best[src]).float().mean().item()
                    print(f"  rows {'along tokens' if t else 'along channels'} {bm}x{bd} w{w} s{st}: {timed(f, flush):.1f} us flushed, "
                          f"{median_ms(cuda_graph(f, 5).replay, 10) / 5 * 1e3:.1f} us not; regs {k.n_regs} spills {k.n_spills} best equal {same:.5f}", flush=True)
                except Exception as e:
                    print(f"  rows T={t} {bm}x{bd}: failed {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
