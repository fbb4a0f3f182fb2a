"""Host microseconds of the pieces of one Triton launch, in a tight loop (a warm host, unlike in situ),
for a kernel with agentsd's typical arguments (8 tensors, 10 ints, 3 constexprs).

    PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/launch_pieces.py
"""
import statistics
import time

import torch
import triton
import triton.language as tl

from agentsd import kernels


@triton.jit
def _k(a, b, c, d, e, f, g, h, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, BLOCK: tl.constexpr, X: tl.constexpr, Y: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(a + i, tl.load(b + i, mask=i < n0, other=0.0), mask=i < n0)


def per_call_us(fn, calls=2000, rounds=7):
    out = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main():
    bufs = [torch.zeros(4096, device="cuda") for _ in range(8)]
    ints = [4096, 320, 2, 1024, 64, 3, 4096 * 320, 320, 1, 77]
    const = dict(BLOCK=1024, X=2, Y=True)
    compiled = _k[(4,)](*bufs, *ints, **const)
    runner = compiled[(4, 1, 1)]
    kernels._launch(_k, (4,), *bufs, *ints, **const)  # first launch: records the specialization
    addresses = [b.data_ptr() for b in bufs]
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    stream = torch.cuda.current_stream().cuda_stream
    grid2d, idx = bufs[0].view(2, 2048), torch.arange(100, device="cuda")

    pieces = {
        "kernel[grid](...) (JIT)": lambda: _k[(4,)](*bufs, *ints, **const),
        "compiled[grid](*tensors) (before 4aed437)": lambda: compiled[(4, 1, 1)](*bufs, *ints, 1024, 2, True),
        "runner(*tensors) (runner made once)": lambda: runner(*bufs, *ints, 1024, 2, True),
        "kernels._launch (4aed437)": lambda: kernels._launch(_k, (4,), *bufs, *ints, **const),
        "  its key alone": lambda: kernels._launch_key(_k, 0, (*bufs, *ints), const),
        "  _launch_hooks_idle": kernels._launch_hooks_idle,
        "compiled.run(..., addresses) (stream given)": lambda: run(4, 1, 1, stream, function, metadata, None, None, None, *addresses, *ints, 1024, 2, True),
        "compiled.run(..., tensors) (stream given)": lambda: run(4, 1, 1, stream, function, metadata, None, None, None, *bufs, *ints, 1024, 2, True),
        "raw stream lookup": lambda: torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()),
        "torch.empty((2, 4096), int64)": lambda: torch.empty(2, 4096, dtype=torch.int64, device="cuda"),
        "torch.zeros((2, 256, 642), int64)": lambda: torch.zeros(2, 256, 642, dtype=torch.int64, device="cuda"),
        "torch.empty_like": lambda: torch.empty_like(bufs[0]),
        "triton.cdiv": lambda: triton.cdiv(5000, 64),
        "x.index_select(1, idx)": lambda: grid2d.index_select(1, idx),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}: host us per call, tight loop")
    for name, fn in pieces.items():
        fn()
        print(f"  {name:48s} {per_call_us(fn):7.2f} us", flush=True)


if __name__ == "__main__":
    main()
