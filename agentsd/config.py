"""Settings of a patch, validated once at apply_patch: frozen dataclasses, clear errors."""

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


ATTN_PRECISIONS = (None, "fp32")
# Defaults of apply_patch: the paper's ratio, and the official AgentSD code's k_scale2 and k_shortcut.
RATIO, K_SCALE2, K_SHORTCUT = 0.4, 0.3, 0.075
# k_scale2 is an exponent of the usual scale d**-0.5: 0 leaves the broadcast logits unscaled, 1 scales them
# as ordinary attention does. k_shortcut weighs the V shortcut against the attention output (1: equal).
K_SCALE2_RANGE, K_SHORTCUT_RANGE = (0.0, 1.0), (0.0, 1.0)
MAX_DOWNSAMPLES = (1, 2, 4, 8)  # the four resolution levels of SD 1.x/2.x UNets (SDXL has three)
# Blocks that see fewer tokens are not merged: at 4096 tokens (SD 1.5 at 512px, SDXL's second level at
# 1024px) a merge plan that cost nothing would speed a UNet call up by 1.02-1.04x at most (H100, CUDA
# graph; docs/performance.md), and eager calls of that size are bound by the host, where the plan's
# launches cost more than that; at 9216 tokens (768px) agentsd's stages give 1.08-1.14x.
MIN_TOKENS = 8192
# The destinations' seed unless one is given: the same in every process, so that a pipeline call with
# the same generator gives the same image anywhere, as it does unpatched (torch's own initial seed
# differs from process to process).
SEED = 0


@dataclass(frozen=True)
class Stage:
    """Settings used until `end`, a fraction of the denoising trajectory in (0, 1].

    `ratio=None` takes apply_patch's `ratio`. An `agent_ratio` too small for agents to pay
    (2n >= N - t, for example 0) makes the stage plain ToMe.
    """

    end: float
    sx: int
    sy: int
    agent_ratio: float
    ratio: float | None = None


def paper_schedule(ratio: float) -> tuple[Stage, ...]:
    """The AgentSD paper's setting (Han et al. 2024; official AgentSD README): agent attention for
    the first 20 of 50 steps (sx=sy=4, agent_ratio=0.95), plain ToMe after (sx=sy=2, agent_ratio=0.5)."""
    return (
        Stage(end=0.4, sx=4, sy=4, agent_ratio=0.95, ratio=ratio),
        Stage(end=1.0, sx=2, sy=2, agent_ratio=0.5, ratio=ratio),
    )


@dataclass(frozen=True)
class AgentSDConfig:
    stages: tuple[Stage, ...]
    max_downsample: int | None  # None: the top level that has transformer blocks
    k_scale2: float
    k_shortcut: float
    attn_precision: str | None
    use_rand: bool
    seed: int  # 32-bit key of the destination patterns (use_rand)
    merge_attn: bool
    merge_crossattn: bool
    merge_mlp: bool
    min_tokens: int


def build_config(
    *,
    ratio=RATIO,
    sx=None,
    sy=None,
    agent_ratio=None,
    schedule=None,
    max_downsample=None,
    k_scale2=K_SCALE2,
    k_shortcut=K_SHORTCUT,
    attn_precision=None,
    use_rand=True,
    seed=SEED,
    merge_attn=True,
    merge_crossattn=False,
    merge_mlp=False,
    min_tokens=None,
) -> AgentSDConfig:
    """Check every argument of apply_patch; raise TypeError/ValueError naming the parameter."""
    ratio = _ratio("ratio", ratio)
    fixed = {"sx": sx, "sy": sy, "agent_ratio": agent_ratio}
    given = [name for name, value in fixed.items() if value is not None]
    if given and schedule is not None:
        raise ValueError(f"give either `schedule` or sx, sy and agent_ratio, not both (got schedule and {', '.join(given)})")
    if given and len(given) < 3:
        missing = [name for name in fixed if name not in given]
        raise ValueError(
            "sx, sy and agent_ratio go together: give all three for one fixed setting, or none for the "
            f"paper's schedule (missing: {', '.join(missing)})"
        )
    if given:
        stages = (Stage(end=1.0, sx=sx, sy=sy, agent_ratio=agent_ratio, ratio=ratio),)
    elif schedule is None:
        stages = paper_schedule(ratio)
    else:
        stages = _schedule(schedule, ratio)
    stages = tuple(_stage(f"stage {i}" if len(stages) > 1 else "", s) for i, s in enumerate(stages))

    if max_downsample is not None and (_is_bool(max_downsample) or max_downsample not in MAX_DOWNSAMPLES):
        raise ValueError(f"max_downsample must be None or one of {MAX_DOWNSAMPLES}, got {max_downsample!r}")
    if attn_precision not in ATTN_PRECISIONS:
        raise ValueError(f"attn_precision must be one of {ATTN_PRECISIONS}, got {attn_precision!r}")
    if min_tokens is None:
        min_tokens = MIN_TOKENS
    if not isinstance(min_tokens, numbers.Integral) or _is_bool(min_tokens) or min_tokens < 0:
        raise ValueError(f"min_tokens must be None or an int >= 0, got {min_tokens!r}")
    if not isinstance(seed, numbers.Integral) or _is_bool(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return AgentSDConfig(
        stages=stages,
        max_downsample=max_downsample,
        k_scale2=_within("k_scale2", k_scale2, K_SCALE2_RANGE),
        k_shortcut=_within("k_shortcut", k_shortcut, K_SHORTCUT_RANGE),
        attn_precision=attn_precision,
        use_rand=_flag("use_rand", use_rand),
        seed=int(seed),
        merge_attn=_flag("merge_attn", merge_attn),
        merge_crossattn=_flag("merge_crossattn", merge_crossattn),
        merge_mlp=_flag("merge_mlp", merge_mlp),
        min_tokens=int(min_tokens),
    )


def _schedule(schedule, ratio: float) -> tuple[Stage, ...]:
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise TypeError(
            "schedule must be a non-empty list of agentsd.Stage or of dicts with keys end, sx, sy, "
            f"agent_ratio (and optionally ratio), got {schedule!r}"
        )
    stages = []
    fields = {f.name for f in dataclasses.fields(Stage)}
    for i, item in enumerate(schedule):
        if isinstance(item, Mapping):
            unknown = set(item) - fields
            missing = fields - {"ratio"} - set(item)
            if unknown or missing:
                raise ValueError(
                    f"schedule[{i}] must have keys end, sx, sy, agent_ratio and optionally ratio "
                    f"(unknown: {sorted(unknown)}, missing: {sorted(missing)})"
                )
            item = Stage(**item)
        if not isinstance(item, Stage):
            raise TypeError(f"schedule[{i}] must be an agentsd.Stage or a dict, got {item!r}")
        stages.append(item if item.ratio is not None else dataclasses.replace(item, ratio=ratio))
    ends = [_real(f"schedule[{i}].end", s.end) for i, s in enumerate(stages)]
    if any(not 0 < end <= 1 for end in ends) or any(a >= b for a, b in zip(ends, ends[1:])) or ends[-1] != 1:
        raise ValueError(f"schedule ends must rise strictly within (0, 1] and the last must be 1.0, got {ends}")
    return tuple(stages)


def _stage(where: str, stage: Stage) -> Stage:
    prefix = f"{where}: " if where else ""
    for name in ("sx", "sy"):
        value = getattr(stage, name)
        if not isinstance(value, numbers.Integral) or _is_bool(value) or value < 1:
            raise ValueError(f"{prefix}{name} must be a positive integer, got {value!r}")
    return dataclasses.replace(
        stage,
        end=float(stage.end),
        sx=int(stage.sx),
        sy=int(stage.sy),
        ratio=_ratio(f"{prefix}ratio", stage.ratio),
        agent_ratio=_ratio(f"{prefix}agent_ratio", stage.agent_ratio),
    )


def _ratio(name: str, value) -> float:
    value = _real(name, value)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _within(name: str, value, bounds: tuple[float, float]) -> float:
    value = _real(name, value)
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name} must be in [{bounds[0]:g}, {bounds[1]:g}], got {value!r}")
    return value


def _real(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or _is_bool(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _flag(name: str, value) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _is_bool(value) -> bool:
    return isinstance(value, bool)
