"""Speed and memory of one UNet call (for kernel work; what users feel is `agentsd benchmark speed`):
SDPA baseline, the nocore ceiling, public tomesd, ToDo, agentsd's agent and ToMe stages, the paper's
schedule, and free-plan bounds.

    python scripts/speed_benchmark.py --single-call --quick       # a subset, under 3 minutes on an H100
    python scripts/speed_benchmark.py --single-call               # every config, eager and CUDA graph
    python scripts/speed_benchmark.py --single-call --modes compile --configs sd15-1024 sd15-2048

Random-weight UNets from the public configs (speed does not depend on weight values), fp16,
classifier-free-guidance batch 2, one UNet call; median of --reps calls timed with CUDA events
after warm-up; every variant of a config in one process, so they compare as ratios. Peak memory
is read in eager mode before any CUDA graph of the config exists. Without CUDA it runs a tiny
configuration on the CPU, which only checks that the script works.
"""

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import json
import statistics
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agentsd  # noqa: E402
from agentsd.models import CONTEXT, TINY_UNET_CONFIGS, unet_from_config  # noqa: E402
from agentsd.block import is_lean  # noqa: E402
from bench_processors import FreePlanProcessor, NoCoreProcessor, ToDoProcessor, blocks_up_to, grid_of, lean_free_forward  # noqa: E402
from timing import cuda_graph, times_ms  # noqa: E402

CONFIGS = {
    "sd15-512": ("sd15", 512), "sd15-768": ("sd15", 768), "sd15-1024": ("sd15", 1024), "sd15-2048": ("sd15", 2048),
    "sdxl-1024": ("sdxl", 1024), "sdxl-2048": ("sdxl", 2048), "sd21-768": ("sd21", 768),
}  # fmt: skip
DEFAULT_CONFIGS = ["sd15-512", "sd15-768", "sd15-1024", "sd15-2048", "sdxl-1024", "sdxl-2048"]
VARIANTS = ["sdpa", "nocore", "tomesd", "todo", "agent", "free-agent", "tome", "free-tome"]
# On request: the agentsd patch with nothing merged (ratio 0), its blocks' lean forward alone
ALL_VARIANTS = [*VARIANTS[:4], "no-merge", *VARIANTS[4:]]
STAGES = {"agent": dict(sx=4, sy=4, agent_ratio=0.95), "tome": dict(sx=2, sy=2, agent_ratio=0.5)}
SCHEDULE = {"agent": 0.4, "tome": 0.6}  # the paper's split of the trajectory
TOP_LEVEL = {"sd15": 1, "sd21": 1, "sdxl": 2}
EAGER_TURN = 5  # timed eager calls of a variant in a row (after 3 untimed)
COMPILE_TURNS = 4  # turns of the compiled variants, each timing reps / 4 rows of IN_A_ROW calls
IN_A_ROW = 5  # compiled calls timed in a row, as a denoising loop issues them


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=None, choices=sorted(CONFIGS), help="model-resolution pairs")
    parser.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph", "compile"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=ALL_VARIANTS)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.4, 0.5])
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode (reduce-overhead replays CUDA graphs of the compiled code)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="sd15 512 and 1024, ratio 0.4, eager and graph")
    parser.add_argument("--out", default="outputs/speed")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    configs = DEFAULT_CONFIGS if args.configs is None else args.configs
    if args.quick:
        configs, args.ratios, args.reps = ["sd15-512", "sd15-1024"], [0.4], 10
        args.modes = [m for m in args.modes if m != "compile"]
    if not cuda:  # a smoke test of the script on the CPU: one tiny config
        configs, args.reps, args.steps = ["tiny-sd15"], 2, 3
        args.modes = ["eager"]
    device = torch.device("cuda" if cuda else "cpu")

    rows, memory_rows = [], []
    for config in configs:
        kind, size = ("sd15", 64) if config == "tiny-sd15" else CONFIGS[config]
        unet = unet_from_config(kind, tiny=config.startswith("tiny")).to(device, torch.float16 if cuda else torch.float32).eval()
        inputs = unet_inputs(unet, kind, size, device)
        measure(unet, inputs, "eager", 5, device)  # warm the GPU clocks and kernels before the first variant
        for ratio in args.ratios:
            for mode in args.modes:
                names = [n for n in args.variants if not (mode == "compile" and n == "tomesd")]
                if mode == "compile" and cuda:
                    times, errors = compiled_turns(unet, kind, names, ratio, inputs, args.reps, args.compile_mode)
                    rows += result_rows(config, f"compile ({args.compile_mode})" if args.compile_mode else mode, ratio, times, errors)
                    continue
                # Eager calls are bound by the host, whose speed drifts: the variants take turns of a few
                # calls each, in a row as in a denoising loop (a variant's first calls after the switch
                # run with cold host caches and are not what a generation sees).
                rounds = max(1, args.reps // EAGER_TURN) if mode == "eager" and cuda else 1
                times = {name: [] for name in names}
                turns = {name: [] for name in names}  # each round's median
                errors = {}
                for round_ in range(rounds):
                    for name in names:
                        if name in errors:
                            continue
                        try:
                            with variant(unet, kind, name, ratio, inputs[0].shape[-2:]):
                                turn = measure(unet, inputs, mode, args.reps // rounds, device)
                                times[name] += turn
                                turns[name].append(statistics.median(turn))
                                if rounds == 1:  # show each graph's result as it comes
                                    print(f"# {config} {mode} {ratio} {name}: {statistics.median(times[name]):.2f} ms", flush=True)
                                if mode == "eager" and cuda and round_ == 0:
                                    memory_rows.append(dict(config=config, variant=name, ratio=ratio, peak_gb=peak_memory(unet, inputs)))
                        except Exception as error:  # tomesd cannot be captured, for example: report it
                            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                rows += result_rows(config, mode, ratio, times, errors, paired_speedups(turns) if rounds > 1 else {})
        del unet, inputs
        gc.collect()
        torch.cuda.empty_cache() if cuda else None

    write_outputs(Path(args.out), rows, memory_rows, device)


def unet_inputs(unet, kind, size, device, width=None):
    """Positional arguments of UNet2DConditionModel.forward for one CFG call at size x (width or size)."""
    batch, dtype, width = 2, unet.dtype, width or size
    text_len, context_width = (77, TINY_UNET_CONFIGS[kind]["cross_attention_dim"]) if unet.config.block_out_channels[0] < 64 else CONTEXT[kind]
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(batch, 4, size // 8, width // 8, generator=g).to(device, dtype)
    context = torch.randn(batch, text_len, context_width, generator=g).to(device, dtype)
    added = None
    if kind == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, width, 0, 0, size, width]] * batch, device=device, dtype=dtype),
        }
    # positional, as pipelines call it (tomesd's hook reads the sample from args[0])
    return sample, torch.tensor(981, device=device), context, None, None, None, None, added


@contextlib.contextmanager
def variant(unet, kind, name, ratio, latent_size):
    top = TOP_LEVEL[kind]
    if name == "sdpa":
        yield
    elif name in STAGES or name == "no-merge":
        agentsd.apply_patch(unet, ratio if name in STAGES else 0.0, **STAGES.get(name, STAGES["agent"]), seed=0)
        try:
            yield
        finally:
            agentsd.remove_patch(unet)
    elif name == "tomesd":
        import tomesd

        tomesd.apply_patch(unet, ratio=ratio, max_downsample=top)
        try:
            yield
        finally:
            tomesd.remove_patch(unet)
    else:
        originals = {}
        for downsample, block in blocks_up_to(unet, top):
            h, w = grid_of(latent_size, downsample)
            if name == "nocore":
                processor = NoCoreProcessor()
            elif name == "todo":
                processor = ToDoProcessor(h, w)
            else:
                stage = STAGES[name.removeprefix("free-")]
                num_dst = (h // stage["sy"]) * (w // stage["sx"])
                processor = FreePlanProcessor(h * w, num_dst, ratio, stage["agent_ratio"], unet.device)
                if is_lean(block):  # the stages' blocks run lean_forward
                    block.forward = lean_free_forward(block, processor)
            originals[block] = block.attn1.processor
            block.attn1.set_processor(processor)
        try:
            yield
        finally:
            for block, processor in originals.items():
                block.attn1.set_processor(processor)
                block.__dict__.pop("forward", None)


def result_rows(config, mode, ratio, times, errors, speedups=None):
    """Rows of one config, mode and ratio: each variant's median or its error (and its paired
    speed-up over SDPA, where given), then the schedule's."""
    rows = []
    for name in dict.fromkeys([*times, *errors]):
        row = dict(config=config, mode=mode, variant=name, ratio=ratio)
        row.update(error=errors[name]) if name in errors else row.update(ms=statistics.median(times[name]))
        if name in (speedups or {}) and name not in errors:
            row.update(speedup=speedups[name])
        rows.append(row)
        print(json.dumps(row), flush=True)
    add_schedule_rows(rows, config, mode, ratio)
    return rows


def paired_speedups(turns):
    """{variant: median over rounds of SDPA's turn time over the variant's}, from each round's median
    per variant. The host's speed drifts by tens of percent within a run (docs/results/2026-11-24-h100/
    lean_forward.md); a variant's turn sits seconds from SDPA's of the same round, so the drift
    between rounds cancels."""
    base = turns.get("sdpa")
    if not base:
        return {}
    return {name: statistics.median(b / t for b, t in zip(base, ts)) for name, ts in turns.items() if len(ts) == len(base)}


@torch.no_grad()
def measure(unet, inputs, mode, reps, device):
    """Milliseconds of `reps` calls in `mode`: eager or a replayed CUDA graph."""
    call = lambda: unet(*inputs)  # noqa: E731
    if device.type != "cuda" or mode == "eager":
        return times_ms(call, reps, warmup=3)
    graph = cuda_graph(call)
    return times_ms(graph.replay, reps)


@torch.no_grad()
def compiled_turns(unet, kind, names, ratio, inputs, reps, compile_mode=None, backend="inductor", turns=COMPILE_TURNS):
    """({variant: milliseconds of `reps` calls}, {variant: error}) of torch.compile'd variants that
    take `turns` turns. A compiled SD 1.5 1024 call is close to bound by the host, whose slow spells
    last several calls: timed one after another, a variant could meet a spell that the others missed
    (the agent stage at 0.84x in one run, 1.40x in the next on the same H100 host,
    docs/results/2026-11-24-h100/speed_compile_ded7c34.md). Patching the UNet anew for each turn
    would recompile (new processors, new hooks), so each variant patches and compiles its own copy.

    A time is that of IN_A_ROW calls issued back to back, per call: in a denoising loop the host
    prepares a compiled call (guards, CUDA-graph launch: ~7 ms at SDXL 1024px with
    reduce-overhead) while the GPU runs the one before. Timed one by one with a sync between them,
    every call would also pay that host time, which the GPU then waits for."""
    torch._dynamo.reset()
    calls, errors = {}, {}
    with contextlib.ExitStack() as patched:
        for name in names:
            own = copy.deepcopy(unet)
            try:
                patched.enter_context(variant(own, kind, name, ratio, inputs[0].shape[-2:]))
                compiled = torch.compile(own, fullgraph=True, mode=compile_mode, backend=backend)
                times_ms(lambda: compiled(*inputs), 0, warmup=5)  # the first call compiles
                calls[name] = compiled
            except Exception as error:  # reported in the table, as in eager and graph mode
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            print(f"# compiled {name}", flush=True)
        times = {name: [] for name in calls}
        for _ in range(turns):
            for name, compiled in calls.items():
                times[name] += [t / IN_A_ROW for t in times_ms(lambda: in_a_row(compiled, inputs), max(1, reps // turns), warmup=1)]
    return times, errors


def in_a_row(compiled, inputs, calls=IN_A_ROW):
    for _ in range(calls):
        compiled(*inputs)  # the output is dropped, as a loop drops it after its step


@torch.no_grad()
def peak_memory(unet, inputs):
    """GB at the peak of one call. The cached blocks go back first, as in a fresh process: a call
    served from blocks that other variants left behind may hold up to 1 MB more per tensor."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet(*inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def add_schedule_rows(rows, config, mode, ratio):
    """The paper's schedule, weighted 40% agent stage and 60% ToMe stage (and its free-plan bound)."""
    cell = {r["variant"]: r for r in rows if (r["config"], r["mode"], r["ratio"]) == (config, mode, ratio)}
    for name, parts in (("schedule", ("agent", "tome")), ("free-schedule", ("free-agent", "free-tome"))):
        if all(cell.get(p, {}).get("ms") for p in parts):
            weights = [SCHEDULE[p.removeprefix("free-")] for p in parts]
            row = dict(config=config, mode=mode, variant=name, ratio=ratio, ms=sum(w * cell[p]["ms"] for w, p in zip(weights, parts)))
            if all(cell[p].get("speedup") for p in parts):  # time-weighted, as ms is
                row.update(speedup=1 / sum(w / cell[p]["speedup"] for w, p in zip(weights, parts)))
            rows.append(row)


@torch.no_grad()
def write_outputs(out: Path, rows, memory_rows, device):
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test, timings meaningless)"
    header = (f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
              f"{datetime.date.today().isoformat()}, fp16, CFG batch 2")  # fmt: skip
    with open(out / "speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["config", "mode", "variant", "ratio", "ms", "speedup", "error"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "speed.json").write_text(json.dumps(dict(header=header, calls=rows, memory=memory_rows), indent=1))
    table = markdown(header, rows, memory_rows)
    (out / "speed.md").write_text(table)
    print(table)


def markdown(header, rows, memory_rows):
    lines = [f"Measured on {header}.", ""]
    if any(r.get("speedup") for r in rows):
        lines += ["Speed-ups of rows that took turns in rounds (eager): the median over rounds of SDPA's turn "
                  "over the variant's; others: SDPA's median over the variant's.", ""]  # fmt: skip
    if not rows:
        lines.append("(no single-call timings in this run)")
    keys = sorted({(r["config"], r["mode"], r["ratio"]) for r in rows}, key=lambda k: (k[1], k[0], k[2]))
    names = [n for n in ALL_VARIANTS + ["schedule", "free-schedule"] if any(r["variant"] == n for r in rows)]
    if rows:
        lines.append("| mode | config | ratio | " + " | ".join(names) + " |")
        lines.append("|---" * (3 + len(names)) + "|")
    for config, mode, ratio in keys:
        cell = {r["variant"]: r for r in rows if (r["config"], r["mode"], r["ratio"]) == (config, mode, ratio)}
        base = cell.get("sdpa", {}).get("ms")
        out = []
        for n in names:
            r = cell.get(n)
            if r is None:
                out.append("")
            elif r.get("error"):
                out.append("fails")
            else:
                text = f"{r['ms']:.1f} ms"
                if base:
                    speedup = r.get("speedup") or base / r["ms"]
                    text += f" ({speedup:.2f}x"
                    free = cell.get(f"free-{n}") if n in ("agent", "tome", "schedule") else None
                    if free and free.get("ms"):
                        free_speedup = free.get("speedup") or base / free["ms"]
                        text += f", {speedup / free_speedup:.0%} of free"
                    text += ")"
                out.append(text)
        lines.append(f"| {mode} | {config} | {ratio} | " + " | ".join(out) + " |")
    errors = {r["error"] for r in rows if r.get("error")}
    lines += [""] + [f"- fails: {e}" for e in sorted(errors)]
    if memory_rows:
        lines += ["", "Peak GPU memory of one eager call (GB, weights included):", "",
                  "| config | ratio | " + " | ".join(names[: len(ALL_VARIANTS)]) + " |",
                  "|---" * (2 + len(names[: len(ALL_VARIANTS)])) + "|"]  # fmt: skip
        for config, ratio in sorted({(r["config"], r["ratio"]) for r in memory_rows}):
            cell = {r["variant"]: r["peak_gb"] for r in memory_rows if (r["config"], r["ratio"]) == (config, ratio)}
            lines.append(f"| {config} | {ratio} | " + " | ".join(f"{cell[n]:.2f}" if n in cell else "" for n in names[: len(ALL_VARIANTS)]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
