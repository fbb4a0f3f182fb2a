"""Where the time of one UNet call goes, per variant: the GPU kernels that take the most device
time, host milliseconds per eager call, and kernel launches per call (torch.profiler); with
--python also the Python functions that take the most host time (cProfile).

    python scripts/profile_call.py --configs sd15-512 sd15-1024 --variants sdpa agent tome
    python scripts/profile_call.py --configs sdxl-1024 --variants sdpa agent --python
    python scripts/profile_call.py --configs sdxl-1024 --variants sdpa agent --compile-mode reduce-overhead
"""

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from speed_benchmark import CONFIGS, unet_inputs, variant
from timing import median_ms
from agentsd.models import unet_from_config


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["sd15-512", "sd15-1024"], choices=sorted(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["sdpa", "agent", "tome"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--python", action="store_true", help="also profile the host's Python with cProfile")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead"],
                        help="profile the torch.compile'd UNet (fullgraph) in this mode")  # fmt: skip
    parser.add_argument("--dump", default=None, help="with --python, save each variant's cProfile stats in this folder")
    args = parser.parse_args(argv)
    for config in args.configs:
        kind, size = CONFIGS[config]
        unet = unet_from_config(kind).to("cuda", torch.float16).eval()
        inputs = unet_inputs(unet, kind, size, torch.device("cuda"))
        for name in args.variants:
            with variant(unet, kind, name, args.ratio, inputs[0].shape[-2:]):
                model = unet
                if args.compile_mode:
                    torch._dynamo.reset()
                    model = torch.compile(unet, fullgraph=True, mode=args.compile_mode)
                call = lambda: model(*inputs)  # noqa: E731
                for _ in range(5):
                    call()
                print(f"\n== {config} {name}: median {median_ms(call, 20):.2f} ms per call, timed one by one (CUDA events)")
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.calls):
                    call()
                host_ms = (time.perf_counter() - start) * 1e3 / args.calls  # launch time: the GPU queue is not drained
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.calls):
                        call()
                    torch.cuda.synchronize()
                if args.python:
                    python = cProfile.Profile()
                    python.runcall(lambda: [call() for _ in range(args.calls)])
            events = prof.key_averages()
            launches = sum(e.count for e in events if "LaunchKernel" in e.key) / args.calls
            device_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"\n== {config} {name}: host {host_ms:.1f} ms/call to launch, {launches:.0f} launches/call, "
                  f"kernels {device_ms / 1e3 / args.calls:.2f} ms/call")  # fmt: skip
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))
            if args.python:
                pstats.Stats(python).sort_stats("tottime").print_stats(args.rows)
                if args.dump:
                    Path(args.dump).mkdir(parents=True, exist_ok=True)
                    python.dump_stats(Path(args.dump) / f"{config}-{name}.pstats")


if __name__ == "__main__":
    main()
