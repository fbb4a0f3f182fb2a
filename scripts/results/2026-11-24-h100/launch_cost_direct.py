"""In-situ host cost of one Triton launch (through `kernel[grid]`, through the compiled kernel's runner
`compiled[grid]`, and through agentsd.kernels._launch, which calls the launcher itself with tensor addresses),
one torch.empty and one small torch op inside eager SD 1.5 512 UNet calls: K extra ops in a pre-hook of
each of the 5 level-1 blocks. Run from the repo root: PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/launch_cost_direct.py"""
import statistics
import torch, triton, triton.language as tl
from diffusers.models.attention import BasicTransformerBlock
from agentsd.models import unet_from_config
from speed_benchmark import unet_inputs
from agentsd import kernels


@triton.jit
def _k(a, b, c, d, e, n, m, p, q, r, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(a + i, tl.load(b + i, mask=i < n, other=0.0), mask=i < n)


@torch.no_grad()
def main():
    unet = unet_from_config("sd15").to("cuda", torch.float16).eval()
    inputs = unet_inputs(unet, "sd15", 512, torch.device("cuda"))
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    blocks = [blocks[i] for i in (0, 1, -3, -2, -1)]
    bufs = [torch.zeros(8192, device="cuda") for _ in range(5)]
    small = torch.zeros(16, device="cuda")
    compiled = _k[(8,)](*bufs, 8192, 2, 3, 4, 5, BLOCK=1024, FLAG=True)
    runner = compiled[(8, 1, 1)]
    ops = {
        "none": lambda: None,
        "triton jit": lambda: _k[(8,)](*bufs, 8192, 2, 3, 4, 5, BLOCK=1024, FLAG=True),
        "triton direct": lambda: runner(*bufs, 8192, 2, 3, 4, 5, 1024, True),
        "agentsd _launch": lambda: kernels._launch(_k, (8,), *bufs, 8192, 2, 3, 4, 5, BLOCK=1024, FLAG=True),
        "torch.empty": lambda: torch.empty(2, 4096, dtype=torch.int64, device="cuda"),
        "torch add_": lambda: small.add_(1),
    }
    current = ["none"]
    K = 6

    def hook(module, args, kwargs):
        op = ops[current[0]]
        for _ in range(K):
            op()

    for b in blocks:
        b.register_forward_pre_hook(hook, with_kwargs=True)
    times = {name: [] for name in ops}
    for name in ops:
        current[0] = name
        for _ in range(3):
            unet(*inputs)
    torch.cuda.synchronize()
    for turn in range(12):
        for name in ops:
            current[0] = name
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); unet(*inputs); end.record(); end.synchronize()
                times[name].append(start.elapsed_time(end))
    base = statistics.median(times["none"])
    print(f"eager SD 1.5 512 call: {base:.2f} ms (host-bound); per op in situ ({K} per block x 5 blocks):")
    for name in ops:
        m = statistics.median(times[name])
        print(f"  {name:14s} {m:7.2f} ms  {(m - base) * 1e3 / (5 * K):6.1f} us/op")


if __name__ == "__main__":
    main()
