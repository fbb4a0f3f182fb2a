"""Where a compiled first image's time goes: dynamo's timed phases of one fresh process per method,
with empty caches and then with the caches the first left (as `agentsd benchmark speed` does).

    python docs/results/2026-12-07-h100-c/compile_breakdown.py sd15-1024 compile [METHOD ...]
"""
import json, os, subprocess, sys, tempfile, time

if sys.argv[1] == "--child":
    import torch
    from torch._dynamo.utils import compile_times
    from agentsd.speed_benchmark import base_pipeline, generate, method_pipeline, parse_args, timed

    config, method, mode = sys.argv[2:5]
    args = parse_args(["--methods", method])
    with torch.no_grad():
        base, steps, call = base_pipeline(config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        pipe = method_pipeline(base, method, mode, args)
        seconds = timed(lambda: generate(pipe, steps, call))
        second = timed(lambda: generate(pipe, steps, call))
    names, values = compile_times(repr="csv", aggregate=True)
    print(json.dumps(dict(first=seconds, second=second, **{n: float(v) for n, v in zip(names, values)})))
    sys.exit()

config, mode, *methods = sys.argv[1:]
for method in methods or ("baseline", "agentsd"):
    with tempfile.TemporaryDirectory() as caches:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{caches}/triton", AGENTSD_CACHE_DIR=f"{caches}/agentsd",
                   TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor")
        for state in ("cold", "warm"):
            done = subprocess.run([sys.executable, __file__, "--child", config, method, mode], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                print(method, state, "failed:", done.stderr[-2000:], flush=True)
                break
            times = json.loads(done.stdout.strip().splitlines()[-1])
            top = sorted(((v, k) for k, v in times.items() if k not in ("first", "second")), reverse=True)[:12]
            print(f"{config} {mode} {method} {state}: first image {times['first']:.1f} s, second {times['second']:.2f} s",
                  flush=True)
            for v, k in top:
                print(f"    {v:8.2f} s  {k}", flush=True)
