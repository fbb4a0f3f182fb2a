"""Where the host time of the merged level's blocks goes (SDXL 1024, the ten blocks of level 2),
compiled in the default mode: cProfile of the Python and torch.profiler's CPU table, per variant.
Run from the repo root: PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/level_host_profile.py [VARIANT...]"""
import contextlib, cProfile, pstats, sys, torch
from torch.profiler import ProfilerActivity, profile

from agentsd.models import unet_from_config
from level_benchmark import patched_level
from speed_benchmark import in_a_row, unet_inputs
from timing import host_us

names = sys.argv[1:] or ["sdpa", "agent", "tome"]
with torch.no_grad(), contextlib.ExitStack() as patched:
    unet = unet_from_config("sdxl").to("cuda", torch.float16).eval()
    sample, timestep, context = unet_inputs(unet, "sdxl", 1024, torch.device("cuda"))[:3]
    x = torch.randn(2, 64 * 64, 640, device="cuda", dtype=torch.float16)
    for name in names:
        compiled = torch.compile(patched_level(unet, "sdxl", name, 0.4, sample, timestep, patched), fullgraph=True)
        run = lambda: in_a_row(compiled, (x, context), 10)  # noqa: E731
        print(f"\n==== {name}: host {host_us(run, calls=5) / 10 / 1e3:.3f} ms per call", flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70), flush=True)
