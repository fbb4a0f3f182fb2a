"""Whole generations against the baseline and the peers (= `agentsd benchmark speed`, its options); with
--single-call, one UNet call against the free-plan and no-attention bounds (unet_call_benchmark.py).

    python scripts/speed_benchmark.py --configs sd15-1024 --rounds 5
    python scripts/speed_benchmark.py --single-call --quick
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--single-call" in argv:
        from unet_call_benchmark import main

        main([a for a in argv if a != "--single-call"])
    else:
        from agentsd.speed_benchmark import main

        main(argv, prog="python scripts/speed_benchmark.py")
