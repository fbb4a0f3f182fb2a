"""Matching kernel variants at SD 1.5 level-1 shapes (H100), each config forced: SLOT=0 the resident
kernel of 788651c (a reduction across threads per destination tile), SLOT=1 a running best per
accumulator slot; `_tma_kernel` the same with destination tiles by TMA (host TensorDescriptor).
PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/slot_best_variants.py       (GPU)
python scripts/results/2026-11-24-h100/slot_best_variants.py compile SLOT BM BD W ST  (sm_90 registers and spills, no GPU)"""
import re, subprocess, sys, os, tempfile
import torch, triton, triton.language as tl
from agentsd import kernels
from agentsd.kernels import _source_tokens, _keep_best, _rows_as_accumulator, _dot_update, _store_best


@triton.jit
def _slot_best_kernel(
    x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr,
    N, D, W, stride_xb, stride_xn, stride_xc, stride_db, stride_dd,
    SY: tl.constexpr, SX: tl.constexpr, IEEE: tl.constexpr,
    C_A: tl.constexpr, C_B: tl.constexpr, C_REST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, SLOT: tl.constexpr,
):
    b = tl.program_id(1)
    sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = sources < N - D
    tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
    x_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xn
    cols_a = tl.arange(0, C_A)
    rows_a = _rows_as_accumulator(x_rows, cols_a, row_ok, stride_xc, IEEE)
    squared_norm = tl.sum(rows_a * rows_a, axis=1)
    if C_B > 0:
        cols_b = C_A + tl.arange(0, C_B)
        rows_b = _rows_as_accumulator(x_rows, cols_b, row_ok, stride_xc, IEEE)
        squared_norm += tl.sum(rows_b * rows_b, axis=1)
    if C_REST > 0:
        cols_rest = C_A + C_B + tl.arange(0, C_REST)
        rows_rest = _rows_as_accumulator(x_rows, cols_rest, row_ok, stride_xc, IEEE)
        squared_norm += tl.sum(rows_rest * rows_rest, axis=1)
    inverse_norm = tl.where(row_ok, 1.0 / tl.sqrt(squared_norm), 0.0)
    dtype = x_ptr.dtype.element_ty
    unit_a = (rows_a * inverse_norm[:, None]).to(dtype)
    if C_B > 0:
        unit_b = (rows_b * inverse_norm[:, None]).to(dtype)
    if C_REST > 0:
        unit_rest = (rows_rest * inverse_norm[:, None]).to(dtype)

    dst_base = dst_ptr + b * stride_db
    j = tl.arange(0, BLOCK_D)
    if SLOT:
        run_dot = tl.full([BLOCK_M, BLOCK_D], float("-inf"), dtype=tl.float32)
        run_d0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    else:
        best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best = tl.zeros([BLOCK_M], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        dsts = d0 + j
        dst_cols = dst_base + dsts[None, :] * stride_dd
        in_d = dsts[None, :] < D
        dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dot = _dot_update(dot, unit_a, tl.load(dst_cols + cols_a[:, None], mask=in_d, other=0.0), IEEE)
        if C_B > 0:
            dot = _dot_update(dot, unit_b, tl.load(dst_cols + cols_b[:, None], mask=in_d, other=0.0), IEEE)
        if C_REST > 0:
            dot = _dot_update(dot, unit_rest, tl.load(dst_cols + cols_rest[:, None], mask=in_d, other=0.0), IEEE)
        if SLOT:
            if not EVEN_D:
                dot = tl.where(in_d, dot, float("-inf"))
            better = dot > run_dot  # strict: an earlier tile keeps a tie
            run_dot = tl.where(better, dot, run_dot)
            run_d0 = tl.where(better, d0, run_d0)
        else:
            best_dot, best = _keep_best(dot, d0, dsts, D, best_dot, best, EVEN_D)
    if SLOT:
        best_dot = tl.max(run_dot, axis=1)
        best = tl.min(tl.where(run_dot == best_dot[:, None], run_d0 + j[None, :], 2**30), axis=1)
    _store_best(best_dot, best, score_ptr, best_ptr, b, N, tokens, row_ok)


@triton.jit
def _tma_kernel(
    x_ptr, dst_desc, dst_index_ptr, score_ptr, best_ptr,
    N, D, W, stride_xb, stride_xn, stride_xc,
    SY: tl.constexpr, SX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, SLOT: tl.constexpr,
):
    """320 channels as 5 chunks of 64; destination tiles by TMA from a (B*D, 320) descriptor."""
    b = tl.program_id(1)
    sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = sources < N - D
    tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
    x_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xn
    c = tl.arange(0, 64)
    r0 = _rows_as_accumulator(x_rows, c, row_ok, stride_xc, False)
    r1 = _rows_as_accumulator(x_rows, 64 + c, row_ok, stride_xc, False)
    r2 = _rows_as_accumulator(x_rows, 128 + c, row_ok, stride_xc, False)
    r3 = _rows_as_accumulator(x_rows, 192 + c, row_ok, stride_xc, False)
    r4 = _rows_as_accumulator(x_rows, 256 + c, row_ok, stride_xc, False)
    sq = tl.sum(r0 * r0, axis=1) + tl.sum(r1 * r1, axis=1) + tl.sum(r2 * r2, axis=1) + tl.sum(r3 * r3, axis=1) + tl.sum(r4 * r4, axis=1)
    inv = tl.where(row_ok, 1.0 / tl.sqrt(sq), 0.0)
    dtype = x_ptr.dtype.element_ty
    u0 = (r0 * inv[:, None]).to(dtype)
    u1 = (r1 * inv[:, None]).to(dtype)
    u2 = (r2 * inv[:, None]).to(dtype)
    u3 = (r3 * inv[:, None]).to(dtype)
    u4 = (r4 * inv[:, None]).to(dtype)
    j = tl.arange(0, BLOCK_D)
    if SLOT:
        run_dot = tl.full([BLOCK_M, BLOCK_D], float("-inf"), dtype=tl.float32)
        run_d0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    else:
        best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        best = tl.zeros([BLOCK_M], dtype=tl.int32)
    row0 = b * D
    for d0 in range(0, D, BLOCK_D):
        dsts = d0 + j
        dot = tl.dot(u0, dst_desc.load([row0 + d0, 0]).T)
        dot = tl.dot(u1, dst_desc.load([row0 + d0, 64]).T, dot)
        dot = tl.dot(u2, dst_desc.load([row0 + d0, 128]).T, dot)
        dot = tl.dot(u3, dst_desc.load([row0 + d0, 192]).T, dot)
        dot = tl.dot(u4, dst_desc.load([row0 + d0, 256]).T, dot)
        if SLOT:
            if not EVEN_D:
                dot = tl.where(dsts[None, :] < D, dot, float("-inf"))
            better = dot > run_dot
            run_dot = tl.where(better, dot, run_dot)
            run_d0 = tl.where(better, d0, run_d0)
        else:
            best_dot, best = _keep_best(dot, d0, dsts, D, best_dot, best, EVEN_D)
    if SLOT:
        best_dot = tl.max(run_dot, axis=1)
        best = tl.min(tl.where(run_dot == best_dot[:, None], run_d0 + j[None, :], 2**30), axis=1)
    _store_best(best_dot, best, score_ptr, best_ptr, b, N, tokens, row_ok)


def compile_check(slot, bm, bd, w, st):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    P = lambda d: "*" + d
    sig = {"x_ptr": P("fp16"), "dst_ptr": P("fp16"), "dst_index_ptr": P("i64"), "score_ptr": P("fp32"), "best_ptr": P("i64"),
           "N": "i32", "D": "i32", "W": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_xc": "i32", "stride_db": "i32", "stride_dd": "i32"}
    flags = {"SY": 2, "SX": 2, "IEEE": False, "C_A": 128, "C_B": 128, "C_REST": 64, "BLOCK_M": bm, "BLOCK_D": bd, "EVEN_D": True, "SLOT": bool(slot)}
    sig.update({f: "constexpr" for f in flags})
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig) if name not in ("W", "stride_xn") and sig[name] != "constexpr"}
    c = triton.compile(ASTSource(_slot_best_kernel, sig, flags, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w, num_stages=st))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
    print(out[-400:]) if "Used" not in out else None
    regs = re.findall(r"Used (\d+) registers", out)
    spill = re.findall(r"(\d+) bytes spill stores", out)
    print(f"slot={slot} {bm}x{bd} w{w} s{st}: shared {c.metadata.shared} regs {regs} spill stores {spill}")


def bench():
    from agentsd import merge
    from timing import cuda_graph, median_ms
    torch.manual_seed(0)
    configs = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 32, 8, 4), (128, 32, 8, 6), (128, 128, 8, 2), (64, 64, 4, 4)]
    for n, cell in ((65536, 2), (65536, 4), (16384, 2), (4096, 2)):
        side = int(n ** 0.5)
        x = (torch.randn(2, 320, n, device="cuda") * 20).half().transpose(1, 2)
        x = x + 10 * torch.randn(320, device="cuda").half()
        dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
        D = dst.index.numel()
        unit = torch.nn.functional.normalize(x[:, dst.index].float(), dim=-1).half()
        ref_score, ref_best = kernels.best_destination(x, dst.index, side, cell, cell)
        key = [k for k in kernels._matching_configs_found if k[1] == n and k[2] == D][0]
        f = lambda: kernels.best_destination(x, dst.index, side, cell, cell)
        g = cuda_graph(f, 5); t_ref = median_ms(g.replay, 10) / 5 * 1e3
        print(f"N={n} cell={cell} D={D}: shipped {t_ref:.1f} us (autotuner: {kernels._matching_configs_found[key]})", flush=True)
        src = ~torch.isinf(ref_score)
        for slot in (0, 1):
            for bm, bd, w, st in configs:
                score = torch.empty_like(ref_score); best = torch.empty_like(ref_best)
                def f():
                    return _slot_best_kernel[(triton.cdiv(n - D, bm), 2)](x, unit, dst.index, score, best, n, D, side, *x.stride(),
                        unit.stride(0), unit.stride(1), SY=cell, SX=cell, IEEE=False, C_A=128, C_B=128, C_REST=64, BLOCK_M=bm, BLOCK_D=bd,
                        EVEN_D=D % bd == 0, SLOT=bool(slot), num_warps=w, num_stages=st)
                try:
                    k = f(); g = cuda_graph(f, 5); t = median_ms(g.replay, 10) / 5 * 1e3
                    same = (best[src] == ref_best[src]).float().mean().item()
                    err = (score[src] - ref_score[src]).abs().max().item()
                    print(f"  slot={slot} {bm}x{bd} w{w} s{st}: {t:.1f} us ({t_ref / t:.3f}x) shared {k.metadata.shared} "
                          f"regs {k.n_regs} spills {k.n_spills} best equal {same:.5f} score err {err:.2e}", flush=True)
                except Exception as e:
                    print(f"  slot={slot} {bm}x{bd} w{w} s{st}: failed {str(e)[:150]}", flush=True)
        from triton.tools.tensor_descriptor import TensorDescriptor
        flat = unit.reshape(-1, 320)
        for slot in (0, 1):
            for bm, bd, w, st in configs:
                score = torch.empty_like(ref_score); best = torch.empty_like(ref_best)
                desc = TensorDescriptor.from_tensor(flat, [bd, 64])
                def f():
                    return _tma_kernel[(triton.cdiv(n - D, bm), 2)](x, desc, dst.index, score, best, n, D, side, *x.stride(),
                        SY=cell, SX=cell, BLOCK_M=bm, BLOCK_D=bd, EVEN_D=D % bd == 0, SLOT=bool(slot), num_warps=w, num_stages=st)
                try:
                    k = f(); g = cuda_graph(f, 5); t = median_ms(g.replay, 10) / 5 * 1e3
                    same = (best[src] == ref_best[src]).float().mean().item()
                    err = (score[src] - ref_score[src]).abs().max().item()
                    print(f"  tma slot={slot} {bm}x{bd} w{w} s{st}: {t:.1f} us ({t_ref / t:.3f}x) shared {k.metadata.shared} "
                          f"regs {k.n_regs} spills {k.n_spills} best equal {same:.5f} score err {err:.2e}", flush=True)
                except Exception as e:
                    print(f"  tma slot={slot} {bm}x{bd} w{w} s{st}: failed {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        compile_check(*map(int, sys.argv[2:7]))
    else:
        bench()
