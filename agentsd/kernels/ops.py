"""The three phases as torch.library ops (`torch.ops.agentsd.plan`, `.merge`, `.unmerge`): under
torch.compile dynamo records each as one opaque call with its fake's output shapes (it cannot trace
Triton's autotuner); eager calls run the phase directly, on the device of its tensors.

The ops are defined with torch.library.define / impl, not torch.library.custom_op, whose Python
wrappers (autograd and checks at every call, pytorch/pytorch#139500) cost a compiled call in the
default mode, bound by the host, 60-90 us of host time per op (SDXL 1024 on an H100 host,
docs/results/2026-11-24-h100/custom_op_ab.txt)."""

import functools
import inspect

import torch

from .launch import device_index, run_on
from .layout import PlanShape, plan_layout
from .merging import run_merge
from .planning import run_plan
from .unmerging import run_unmerge

_library = torch.library.Library("agentsd", "DEF")


def _compilable(schema: str, launch, fake, outputs: int, device_at: int = 0):
    """`launch` as it is in eager calls and CUDA graphs; under torch.compile a custom op, which dynamo
    records as one opaque call with `fake`'s output shapes and which runs `launch` at run time. The
    op returns a list: the `outputs` results of `launch` without its trailing Nones, put back here.
    Eager calls skip the dispatcher's host time and run on the device of argument `device_at` (a
    tensor or a device)."""
    name = schema.partition("(")[0]

    def on_device(*args, **kwargs):
        return run_on(device_index(args[device_at]), launch, args, kwargs)

    _library.define(schema)
    # every backend (CUDA; the CPU under Triton's interpreter in the tests); no autograd kernel:
    # the merge has no gradient, and the dispatcher's own fallback costs no Python
    _library.impl(name, _without_none(on_device), "CompositeExplicitAutograd")
    torch.library.register_fake(f"agentsd::{name}", _without_none(fake), lib=_library)
    return _eager_or_op(launch, on_device, getattr(torch.ops.agentsd, name).default, outputs)


def _without_none(fn):
    """fn with its results as a list without the Nones: an op's Tensor[]."""
    return lambda *args: [t for t in fn(*args) if t is not None]


def _eager_or_op(launch, on_device, op, outputs: int):
    """on_device in eager calls; under torch.compile `op` on launch's arguments (defaults filled in),
    its list of results padded back to `outputs` with Nones."""
    signature = inspect.signature(launch)

    @functools.wraps(launch)
    def call(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return on_device(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out = op(*bound.args)
        return (*out, *[None] * (outputs - len(out)))

    return call


def _fake_plan(x, width, sy, sx, downsample, key, seed, timestep, num_merged, num_agent_merged):
    # Under dynamic shapes (torch.compile from a second size on) the sizes are symbols: one graph serves
    # every size, and each call's workspace takes the size of its plan.
    shape = PlanShape(*x.shape, x.dtype, width, sy, sx, num_merged, num_agent_merged)
    return (x.new_empty(plan_layout(shape, x.device).size, dtype=torch.uint8),)


def _fake_merge(x, workspace, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged, with_agents):
    batch = x.shape[0]
    agents = x.new_empty(batch, num_tokens - num_agent_merged, channels) if with_agents else None
    return x.new_empty(batch, num_tokens - num_merged, channels), agents


def _fake_unmerge(y, workspace, residual, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged):
    return (y.new_empty(y.shape[0], num_tokens, y.shape[2]),)


# SymInt: under dynamic shapes the sizes, and what the plan derives from them, are symbols
_PLAN_SHAPE = ("SymInt num_tokens, SymInt channels, ScalarType dtype, SymInt width, int sy, int sx, SymInt num_merged, "
               "SymInt? num_agent_merged")  # fmt: skip
plan = _compilable(
    "plan(Tensor x, SymInt width, int sy, int sx, SymInt downsample, int? key, int seed, Tensor? timestep, "
    "SymInt num_merged, SymInt? num_agent_merged) -> Tensor[]",
    run_plan, _fake_plan, outputs=1,
)  # fmt: skip
merge = _compilable(f"merge(Tensor x, Tensor workspace, {_PLAN_SHAPE}, bool with_agents) -> Tensor[]", run_merge, _fake_merge, outputs=2)
unmerge = _compilable(f"unmerge(Tensor y, Tensor workspace, Tensor? residual, {_PLAN_SHAPE}) -> Tensor[]", run_unmerge, _fake_unmerge, outputs=1)
