"""Matching with the rows as wgmma's register operand: the unit rows come out of an MMA (x @ I), so
Triton keeps them in registers (its MMAV3UseRegOperand rewrite) and shared memory holds destination
tiles only. The prototype of kernels._best_destination_resident_kernel (320 channels only), timed
against the kernel it replaced, shipped at commit 7f6e224. Run from the repo root at that commit:
PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/matching_registers.py
With arguments BLOCK_M BLOCK_D WARPS STAGES it compiles for sm_90 without a GPU and prints the
shared memory and the wgmma forms (a register list where the first operand is in registers)."""
import sys
import torch, triton, triton.language as tl
from agentsd.kernels import _source_tokens, _keep_best


@triton.jit
def _unit_rows(x_rows, cols, row_ok, stride_xc, CW: tl.constexpr):
    """Rows through an MMA with the identity, so that they come out in the accumulator layout."""
    x = tl.load(x_rows + cols[None, :] * stride_xc, mask=row_ok[:, None], other=0.0)
    eye = (tl.arange(0, CW)[:, None] == tl.arange(0, CW)[None, :]).to(x.dtype)
    return tl.dot(x, eye)


@triton.jit
def _rs(x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr, N, D, W, stride_xb, stride_xn, stride_xc, stride_db, stride_dd,
        SY: tl.constexpr, SX: tl.constexpr, C_MAIN: tl.constexpr, C_REST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    # C = 128 + 128 + 64 (SD 1.x level 1)
    b = tl.program_id(1)
    sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = sources < N - D
    tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
    x_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xn
    c0 = tl.arange(0, 128)
    c1 = 128 + tl.arange(0, 128)
    c2 = 256 + tl.arange(0, 64)
    m0 = _unit_rows(x_rows, c0, row_ok, stride_xc, 128)
    m1 = _unit_rows(x_rows, c1, row_ok, stride_xc, 128)
    m2 = _unit_rows(x_rows, c2, row_ok, stride_xc, 64)
    inv = 1.0 / tl.sqrt(tl.sum(m0 * m0, axis=1) + tl.sum(m1 * m1, axis=1) + tl.sum(m2 * m2, axis=1))
    dt = x_ptr.dtype.element_ty
    u0 = (m0 * inv[:, None]).to(dt)
    u1 = (m1 * inv[:, None]).to(dt)
    u2 = (m2 * inv[:, None]).to(dt)
    dst_base = dst_ptr + b * stride_db
    best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best = tl.zeros([BLOCK_M], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        dsts = d0 + tl.arange(0, BLOCK_D)
        dst_cols = dst_base + dsts[None, :] * stride_dd
        ok = dsts[None, :] < D
        dot = tl.dot(u0, tl.load(dst_cols + c0[:, None], mask=ok, other=0.0))
        dot = tl.dot(u1, tl.load(dst_cols + c1[:, None], mask=ok, other=0.0), dot)
        dot = tl.dot(u2, tl.load(dst_cols + c2[:, None], mask=ok, other=0.0), dot)
        best_dot, best = _keep_best(dot, d0, dsts, D, best_dot, best, EVEN_D)
    tl.store(score_ptr + b * N + tokens, best_dot, mask=row_ok)
    tl.store(best_ptr + b * N + tokens, best.to(tl.int64), mask=row_ok)


def bench():
    from agentsd import kernels, merge
    from timing import cuda_graph, median_ms
    torch.manual_seed(0)
    for n, cell in ((65536, 2), (65536, 4), (16384, 2), (16384, 4), (4096, 2), (4096, 4)):
        side = int(n ** 0.5)
        x = (torch.randn(2, 320, n, device="cuda") * 20).half().transpose(1, 2)  # channels-last, as SD 1.x blocks
        x = x + 10 * torch.randn(320, device="cuda").half()  # a shared direction, as block inputs have
        dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
        D = dst.index.numel()
        unit = torch.nn.functional.normalize(x[:, dst.index].float(), dim=-1).half()
        ref_score, ref_best = kernels.best_destination(x, dst.index, side, cell, cell)
        f = lambda: kernels.best_destination(x, dst.index, side, cell, cell)
        g = cuda_graph(f, 5); t_ref = median_ms(g.replay, 10) / 5 * 1e3
        print(f"N={n} cell={cell} D={D}: shipped {t_ref:.1f} us", flush=True)
        score = ref_score.clone(); best = ref_best.clone()
        for bm, bd, w, st in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 4), (128, 32, 8, 6)):
            def f():
                return _rs[(triton.cdiv(n - D, bm), 2)](x, unit, dst.index, score, best, n, D, side, *x.stride(),
                    unit.stride(0), unit.stride(1), SY=cell, SX=cell, C_MAIN=256, C_REST=64, BLOCK_M=bm, BLOCK_D=bd,
                    EVEN_D=D % bd == 0, num_warps=w, num_stages=st)
            try:
                k = f(); g = cuda_graph(f, 5); t = median_ms(g.replay, 10) / 5 * 1e3
                src = ~torch.isinf(ref_score)
                same = (best[src] == ref_best[src]).float().mean().item()
                err = (score[src] - ref_score[src]).abs().max().item()
                print(f"  rs {bm}x{bd} w{w} s{st}: {t:.1f} us ({t_ref / t:.3f}x) shared {k.metadata.shared} "
                      f"regs {k.n_regs} spills {k.n_spills} best equal {same:.5f} score err {err:.2e}", flush=True)
            except Exception as e:
                print(f"  rs {bm}x{bd} w{w} s{st}: failed {str(e)[:150]}", flush=True)


if __name__ == "__main__" and len(sys.argv) == 1:
    bench()
elif __name__ == "__main__":
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import re
    P = lambda d: "*" + d
    sig = {"x_ptr": P("fp16"), "dst_ptr": P("fp16"), "dst_index_ptr": P("i64"), "score_ptr": P("fp32"), "best_ptr": P("i64"),
           "N": "i32", "D": "i32", "W": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_xc": "i32", "stride_db": "i32", "stride_dd": "i32"}
    bm, bd, w, st = map(int, sys.argv[1:5])
    flags = {"SY": 2, "SX": 2, "C_MAIN": 256, "C_REST": 64, "BLOCK_M": bm, "BLOCK_D": bd, "EVEN_D": True}
    sig.update({f: "constexpr" for f in flags})
    c = triton.compile(ASTSource(_rs, sig, flags), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w, num_stages=st))
    ptx = c.asm["ptx"]
    print("shared", c.metadata.shared)
    for l in sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.\S+", ptx))):
        print(l)
    lines = [l for l in ptx.splitlines() if "wgmma.mma_async" in l]
    for l in lines[:: max(1, len(lines) // 4)]:
        print(l.strip()[:60], "...", l.strip()[-60:])
    t = c.asm["ttgir"]
    print([l.strip()[:200] for l in t.splitlines() if "warp_group_dot " in l])
