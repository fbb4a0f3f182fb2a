"""Tune agentsd's matching kernels on this GPU at the common sizes: writes the table that ships with
the package (`<out>/<gpu>.json`, to copy into agentsd/data/kernel_configs/) and the autotuner's time
for every candidate at every key (`<out>/timings-<gpu>.md`, `.json`: what tuning buys over one fixed
config).

    python scripts/collect_kernel_configs.py --out outputs/kernel-configs
    cp outputs/kernel-configs/NVIDIA_H200-sm90.json agentsd/data/kernel_configs/

Random-weight UNets of the public configs, classifier-free-guidance batch 2, one call in each stage
of the paper's schedule (the ToMe-only setting shares the second stage's keys), fp16 and bf16, in an
empty cache (the shipped configs are not read). A table is valid for the kernels' source it was tuned
with (tuned_configs): collect again after any change to agentsd/kernels/.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import agentsd  # noqa: E402
from agentsd import kernels, tuned_configs  # noqa: E402
from agentsd.files import write_whole  # noqa: E402
from agentsd.kernels import matching  # noqa: E402
from agentsd.models import unet_from_config  # noqa: E402
from agentsd.speed_benchmark import header, provenance  # noqa: E402
from unet_call_benchmark import unet_inputs as call_inputs  # noqa: E402

# (height, width) users run, where the default setting merges (min_tokens): SD 1.x/2.x merge their
# first level (h * w / 64 tokens), SDXL its second (h * w / 256)
SIZES = {
    "sd15": [(768, 768), (1024, 768), (1024, 1024), (1536, 1536), (2048, 2048)],
    "sdxl": [(1536, 1536), (2048, 2048)],
    "sd21": [(768, 768), (1024, 1024)],
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/kernel-configs")
    parser.add_argument("--kinds", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="tiny UNets at 64px, everything merged (checks the script on the CPU with TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if not (args.tiny and kernels.INTERPRET):
            parser.error("needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1)")
        kernels.available = lambda x: True  # the kernels in Triton's interpreter, as the tests call them
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agentsd-collect-") as cache:
        os.environ["AGENTSD_CACHE_DIR"] = cache  # tune everything here, in an empty cache
        collect(args, device, out, argv)


def collect(args, device, out: Path, argv) -> None:
    tuned_configs.shipped = lambda gpu: {}
    timings = record_timings()
    gpu = tuned_configs.gpu_name(device)
    head = header(argv, program="python scripts/collect_kernel_configs.py")
    with torch.no_grad():
        for dtype_name in args.dtypes:
            for kind in args.kinds:
                unet = unet_from_config(kind, tiny=args.tiny, device=device).to(dtype=DTYPES[dtype_name])
                agentsd.apply_patch(unet, **({"min_tokens": 0} if args.tiny else {}))
                for height, width in [(64, 64)] if args.tiny else SIZES[kind]:
                    for step in (0, 40):  # of 50: the agent stage, the ToMe stage
                        timings.label = f"{kind} {height}x{width} {dtype_name} step {step}"
                        unet(*unet_inputs(unet, kind, height, width, step))
                del unet
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                write(out, gpu, tuned_configs.collected(device), timings.rows, head)  # each model's as it is done
    print(markdown(timings.rows, gpu, head))


def write(out: Path, gpu: str, table: dict, rows: list[dict], head: dict) -> None:
    write_whole(out / f"{gpu}.json", json.dumps(table, indent=1, sort_keys=True) + "\n")
    write_whole(out / f"timings-{gpu}.json", json.dumps(dict(header=head, rows=rows), indent=1) + "\n")
    write_whole(out / f"timings-{gpu}.md", markdown(rows, gpu, head))
    print(f"{len(table['configs'])} configs -> {out / f'{gpu}.json'}", flush=True)


class record_timings:
    """Wraps the matching's autotuner call: each tuning's key and every candidate's time (us)."""

    def __init__(self):
        self.rows, self.label = [], ""
        tune = matching._autotune

        def recording(tuned, grid, args, meta):
            config = tune(tuned, grid, args, meta)
            x = args[0]
            us = {_name(c): 1000 * _median(t) for c, t in (getattr(tuned, "configs_timings", None) or {}).items()}
            self.rows.append(dict(label=self.label, kernel=tuned.fn.fn.__name__, tokens=x.shape[1], channels=x.shape[2],
                                  best=_name(config), us=us))  # fmt: skip
            return config

        matching._autotune = recording


def _name(config) -> str:
    kwargs = config.all_kwargs()
    return "m{BLOCK_M} d{BLOCK_D} w{num_warps} s{num_stages}".format(**kwargs) + (" shared" if kwargs.get("SHARED_ROWS") else "")


def _median(timing) -> float:
    return timing[0] if isinstance(timing, (list, tuple)) else float(timing)  # Triton: (median, q20, q80)


def markdown(rows: list[dict], gpu: str, head: dict) -> str:
    """Each key's best time, and each fixed config's cost against tuning (its time over the best, the
    worst key and the median of keys)."""
    lines = [f"# Matching kernels' autotuning on {gpu}", "", provenance(head), "", f"`{head['command']}`", "",
             "| key | kernel | tokens | best | best us | slowest us |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        finite = [t for t in r["us"].values() if t != float("inf")]
        lines.append(f"| {r['label']} | {r['kernel'].strip('_')} | {r['tokens']} | {r['best']} | {min(finite, default=0):.1f} | {max(finite, default=0):.1f} |")
    lines += ["", "| kernel | fixed config | keys | worst time / best | median time / best | extra us summed over keys |", "|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in rows}):
        mine = [r for r in rows if r["kernel"] == kernel and r["us"]]
        for name in sorted({n for r in mine for n in r["us"]}):
            ratios = [r["us"].get(name, float("inf")) / min(r["us"].values()) for r in mine]
            extra = sum(r["us"].get(name, float("inf")) - min(r["us"].values()) for r in mine)
            lines.append(f"| {kernel.strip('_')} | {name} | {len(mine)} | {max(ratios):.2f} | {statistics.median(ratios):.2f} | {extra:.0f} |")
    return "\n".join(lines) + "\n"


def unet_inputs(unet, kind: str, height: int, width: int, step: int):
    """Positional UNet arguments of one CFG call at step `step` of a 50-step list of timesteps."""
    inputs = list(call_inputs(unet, kind, height, unet.device, width))
    timesteps = torch.linspace(999, 0, 50, device=unet.device).long()  # the stage follows the index in this list
    inputs[1] = timesteps[step]
    return inputs


if __name__ == "__main__":
    main()
