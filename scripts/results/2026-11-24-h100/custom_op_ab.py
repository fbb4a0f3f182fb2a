"""Host time of the merged level's blocks (SDXL 1024, the ten blocks of level 2) compiled in the
default mode, where they are bound by the host: the kernels' ops defined with torch.library.define /
impl (now) against torch.library.custom_op (before), in one process, variants taking turns.
Run from the repo root: PYTHONPATH=.:scripts python scripts/results/2026-11-24-h100/custom_op_ab.py"""
import contextlib, statistics, torch

from agentsd import kernels
from agentsd.models import unet_from_config
from level_benchmark import patched_level
from speed_benchmark import in_a_row, unet_inputs
from timing import host_us, times_ms

NAMES = ("_plan", "_merge", "_unmerge")
FAKES = {"_plan": (kernels._fake_plan, 1), "_merge": (kernels._fake_merge, 2), "_unmerge": (kernels._fake_unmerge, 1)}


def as_custom_op(name):
    """kernels.<name> registered the way it was before: torch.library.custom_op (namespace agentsd_ab)."""
    launch = getattr(kernels, name).__wrapped__
    fake, outputs = FAKES[name]
    schema = str(getattr(torch.ops.agentsd, name[1:]).default._schema).removeprefix("agentsd::")
    op_name, _, arguments = schema.partition("(")
    on_device = lambda *args: kernels._run_on(kernels._device_index(args[0]), launch, args, {})  # noqa: E731
    op = torch.library.custom_op(f"agentsd_ab::{op_name}", kernels._without_none(on_device), mutates_args=(), schema=f"({arguments}")
    op.register_fake(kernels._without_none(fake))
    return kernels._eager_or_op(launch, on_device, op, outputs)


now = {name: getattr(kernels, name) for name in NAMES}
before = {name: as_custom_op(name) for name in NAMES}


@contextlib.contextmanager
def ops(which):
    for name, fn in which.items():
        setattr(kernels, name, fn)
    try:
        yield
    finally:
        for name, fn in now.items():
            setattr(kernels, name, fn)


torch._dynamo.config.cache_size_limit = 64
with torch.no_grad(), contextlib.ExitStack() as patched:
    unet = unet_from_config("sdxl").to("cuda", torch.float16).eval()
    sample, timestep, context = unet_inputs(unet, "sdxl", 1024, torch.device("cuda"))[:3]
    x = torch.randn(2, 64 * 64, 640, device="cuda", dtype=torch.float16)
    print(torch.cuda.get_device_name(), torch.__version__, "SDXL 1024 level 2, ratio 0.4, compile mode default")
    calls = {}
    for label, name, which in [("sdpa", "sdpa", now), ("agent define/impl", "agent", now), ("agent custom_op", "agent", before),
                               ("tome define/impl", "tome", now), ("tome custom_op", "tome", before)]:
        compiled = torch.compile(patched_level(unet, "sdxl", name, 0.4, sample, timestep, patched), fullgraph=True)

        def run(compiled=compiled, which=which):
            with ops(which):
                in_a_row(compiled, (x, context), 10)

        times_ms(run, 0, warmup=3)
        calls[label] = run
    del unet
    times = {label: [] for label in calls}
    host = {label: [] for label in calls}
    for _ in range(3):
        for label, run in calls.items():
            times[label] += [t / 10 for t in times_ms(run, 10)]
            host[label].append(host_us(run, calls=10) / 10 / 1e3)
    print("\n| variant | ms per call of the level (10 in a row) | host ms per call | over SDPA |\n|---|---|---|---|")
    base = statistics.median(times["sdpa"])
    for label in calls:
        ms = statistics.median(times[label])
        print(f"| {label} | {ms:.3f} | {statistics.median(host[label]):.3f} | {ms - base:+.3f} ms |")
