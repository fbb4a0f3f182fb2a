"""Every resident config forced: agentsd.kernels (fp16 identity, as first written) against kernels_f32id (the identity product in fp32, as shipped at 0949a1d), and kernels.py of 0762fb0 autotuned:
    git show 0762fb0:agentsd/kernels.py | sed 's/"agentsd::{name}"/"agentsd_head::{name}"/' > scratch/kernels_head.py
    PYTHONPATH=.:scripts:scratch python scripts/results/2026-11-24-h100/bm256_sweep.py"""
import torch, triton
import kernels_head, kernels_f32id
from agentsd import kernels, merge
from timing import cuda_graph, median_ms
torch.manual_seed(0)
for n, cell in ((4096, 2), (4096, 4), (16384, 2), (65536, 2)):
    side = int(n ** 0.5)
    x = (torch.randn(2, 320, n, device="cuda") * 20).half().transpose(1, 2)
    x = x + 10 * torch.randn(320, device="cuda").half()
    dst = merge.choose_destinations(merge.Grid(1, side, side), cell, cell, seed=0, timestep=981, device="cuda")
    D = dst.index.numel()
    g = cuda_graph(lambda: kernels_head.best_destination(x, dst.index, side, cell, cell), 5)
    t_head = min(median_ms(g.replay, 10) for _ in range(3)) / 5 * 1e3
    print(f"N={n} cell={cell}: head {t_head:.1f} us ({[str(c) for k, c in kernels_head._matching_configs_found.items() if k[1] == n and k[2] == D]})", flush=True)
    ref = kernels.best_destination(x, dst.index, side, cell, cell)
    for mod in (kernels, kernels_f32id):
        for config in mod._best_destination_resident_kernel.configs:
            key = (mod._best_destination_resident_kernel, n, D, 320, torch.float16)
            mod._matching_configs_found[key] = config
            try:
                f = lambda: mod.best_destination(x, dst.index, side, cell, cell)
                s, b = f()
                g = cuda_graph(f, 5)
                t = min(median_ms(g.replay, 10) for _ in range(3)) / 5 * 1e3
                print(f"  {mod.__name__} {config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_D']} w{config.num_warps} s{config.num_stages}: {t:.1f} us "
                      f"({t_head / t:.3f}x) same best {torch.equal(b, ref[1])}", flush=True)
            except Exception as e:
                print(f"  {mod.__name__} {config}: failed {str(e)[:100]}")
