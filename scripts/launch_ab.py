"""Whole generations with the kernels launched through Triton's public API against agentsd's recorded
launches (which call Triton's compiled launchers directly), in one process, taking turns.

    python scripts/launch_ab.py --configs sd15-768 sd15-1024 --rounds 6
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agentsd import kernels  # noqa: E402
from agentsd.speed_benchmark import CONFIGS, base_pipeline, generate, method_pipeline, timed  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["sd15-1024"], choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    args.deepcache_interval, args.steps = 3, None
    print("| config | public launch s/image | recorded launches s/image | public / recorded (per round: min-median-max) |")
    print("|---|---|---|---|")
    for config in args.configs:
        base, steps, call = base_pipeline(config, torch.device("cuda"))
        pipe = method_pipeline(base, "agentsd", "eager", args)
        seconds = {True: [], False: []}
        with torch.no_grad():
            for direct in (True, False):  # warm-up of both paths
                kernels._DIRECT_LAUNCH = direct
                generate(pipe, steps, call)
            for round_ in range(args.rounds):
                for direct in (round_ % 2 == 0, round_ % 2 == 1):
                    kernels._DIRECT_LAUNCH = direct
                    seconds[direct].append(timed(lambda: generate(pipe, steps, call)))
        ratios = sorted(p / r for p, r in zip(seconds[False], seconds[True]))
        print(f"| {config} | {statistics.median(seconds[False]):.3f} | {statistics.median(seconds[True]):.3f} | "
              f"{ratios[0]:.3f}-{statistics.median(ratios):.3f}-{ratios[-1]:.3f} |", flush=True)  # fmt: skip
        del pipe, base
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
