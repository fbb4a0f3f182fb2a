"""How much of the matching kernel's time is its epilogue (best value and index per row)? A copy of the
resident kernel with four epilogues, timed from CUDA graphs at SD 1.5 level-1 shapes (fp16, batch 2,
320 channels). Run from the repo root: PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/matching_epilogue.py
0: kernels._keep_best (max with index); 1: max value only, the tile of the best kept (wrong index:
a bound); 2: the column packed into the low 6 bits of an integer key; 3: no epilogue (the MMA bound)."""
import torch, triton, triton.language as tl
from agentsd import kernels, merge
from agentsd.kernels import _source_tokens
from timing import cuda_graph, median_ms


@triton.jit
def _match(x_ptr, dst_ptr, dst_index_ptr, score_ptr, best_ptr, N, D, W, stride_xb, stride_xn, stride_db, stride_dd,
           SY: tl.constexpr, SX: tl.constexpr, C_MAIN: tl.constexpr, C_REST: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EPI: tl.constexpr):
    b = tl.program_id(1)
    sources = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = sources < N - D
    tokens = _source_tokens(sources, dst_index_ptr, N, W, SY, SX)
    x_rows = x_ptr + b * stride_xb + tokens[:, None] * stride_xn
    main = tl.arange(0, C_MAIN)
    x_main = tl.load(x_rows + main[None, :], mask=row_ok[:, None], other=0.0)
    rest = C_MAIN + tl.arange(0, C_REST)
    x_rest = tl.load(x_rows + rest[None, :], mask=row_ok[:, None], other=0.0)
    dst_base = dst_ptr + b * stride_db
    best_dot = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dsts = d0 + cols
        dst_cols = dst_base + dsts[None, :] * stride_dd
        d_main = tl.load(dst_cols + main[:, None])
        dot = tl.dot(x_main, d_main)
        d_rest = tl.load(dst_cols + rest[:, None])
        dot = tl.dot(x_rest, d_rest, dot)
        if EPI == 0:  # as kernels._keep_best
            tile_best_dot, tile_best = tl.max(dot, axis=1, return_indices=True)
            better = tile_best_dot > best_dot
            best_dot, best = tl.where(better, tile_best_dot, best_dot), tl.where(better, tile_best.to(tl.int32) + d0, best)
        elif EPI == 1:  # value only, the tile of the best kept
            tile_best_dot = tl.max(dot, axis=1)
            better = tile_best_dot > best_dot
            best_dot, best = tl.where(better, tile_best_dot, best_dot), tl.where(better, d0, best)
        elif EPI == 2:  # packed key: value bits with the column in the low 6 bits
            bits = dot.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key = (key & ~(BLOCK_D - 1)) | (BLOCK_D - 1 - cols[None, :])
            tile_key = tl.max(key, axis=1)
            better = tile_key > best
            best = tl.where(better, tile_key, best)
            best_dot = tl.where(better, d0 * 1.0, best_dot)
        else:  # no epilogue: the MMA bound
            acc += dot
    if EPI == 3:
        best_dot = tl.sum(acc, axis=1)
    tl.store(score_ptr + b * N + tokens, best_dot, mask=row_ok)
    tl.store(best_ptr + b * N + tokens, best.to(tl.int64), mask=row_ok)


def main():
    torch.manual_seed(0)
    for n, cell in ((65536, 2), (65536, 4), (16384, 2)):
        side = int(n ** 0.5)
        x = (torch.randn(2, n, 320, device="cuda") * 20).half()
        dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
        D = dst.index.numel()
        unit = torch.nn.functional.normalize(x[:, dst.index].float(), dim=-1).half()
        score = torch.empty(2, n, device="cuda"); best = torch.empty(2, n, device="cuda", dtype=torch.int64)
        ref = lambda: kernels.best_destination(x, dst.index, side, cell, cell)
        g = cuda_graph(ref, 5); t_ref = median_ms(g.replay, 10) / 5 * 1e3
        print(f"N={n} cell={cell} D={D}: kernels.best_destination {t_ref:.1f} us", flush=True)
        for bm, bd, w, st in ((128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2)):
            for epi in range(4):
                def f():
                    _match[(triton.cdiv(n - D, bm), 2)](x, unit, dst.index, score, best, n, D, side, x.stride(0), x.stride(1),
                        unit.stride(0), unit.stride(1), SY=cell, SX=cell, C_MAIN=256, C_REST=64, BLOCK_M=bm, BLOCK_D=bd,
                        EPI=epi, num_warps=w, num_stages=st)
                try:
                    f(); g = cuda_graph(f, 5); t = median_ms(g.replay, 10) / 5 * 1e3
                    print(f"  {(bm, bd, w, st)} epilogue {epi}: {t:.1f} us", flush=True)
                except Exception as e:
                    print(f"  {(bm, bd, w, st)} epilogue {epi}: fails {str(e)[:80]}", flush=True)


main()
