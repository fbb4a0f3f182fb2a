"""Median milliseconds of a call (CUDA events on the GPU, the host clock on the CPU), host time of
eager launches, and CUDA graphs of calls."""

import statistics
import time

import torch


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    return statistics.median(times_ms(fn, reps, warmup))


def times_ms(fn, reps: int, warmup: int = 3) -> list[float]:
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def host_us(fn, calls: int = 200, warmup: int = 5) -> float:
    """Host microseconds to launch fn once: calls in a row, the GPU queue not drained in between
    (at the sizes where eager calls are host-bound the GPU keeps up, so this is the call's time)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def cuda_graph(fn, repeats: int = 1) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `repeats` calls of fn, warmed up on a side stream as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return graph
