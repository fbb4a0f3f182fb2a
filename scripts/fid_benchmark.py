"""The FID benchmark; the same as `agentsd benchmark` (see agentsd/fid_benchmark.py for the options).

    python scripts/fid_benchmark.py --real-dir imagenet-val --out outputs/fid
    accelerate launch scripts/fid_benchmark.py --real-dir imagenet-val --out outputs/fid
"""

from agentsd.fid_benchmark import main

if __name__ == "__main__":
    main()
