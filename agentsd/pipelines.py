"""Loading a pipeline by name, choosing its scheduler, and patching it by method: what the command
line and the FID benchmark share."""

import warnings

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .config import build_config
from .models import tiny_pipeline
from .patch import apply_patch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_MODELS = {"tiny": "sd15", "tiny-sdxl": "sdxl"}
METHODS = ("baseline", "tome", "agentsd")
SCHEDULERS = {
    "pndm": PNDMScheduler,  # PLMS, the papers' sampler and SD 1.5's default
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoadError(Exception):
    """A pipeline that could not be loaded; the message says what was tried and what to pass."""


def resolve_device(device: str | None = None, dtype: torch.dtype | None = None) -> tuple[str, torch.dtype]:
    """What is not given: CUDA when present; float16 on CUDA, float32 elsewhere."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.float16 if device.startswith("cuda") else torch.float32)


def load_pipeline(model: str, *, dtype: torch.dtype | None = None, device: str | None = None, scheduler: str | None = None):
    """A hub id or local folder as DiffusionPipeline.from_pretrained takes it, or "tiny"/"tiny-sdxl";
    device and dtype default as resolve_device chooses."""
    device, dtype = resolve_device(device, dtype)
    if model in TINY_MODELS:
        pipe = tiny_pipeline(TINY_MODELS[model])
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        try:
            with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype; older releases know only it
                warnings.simplefilter("ignore", FutureWarning)
                pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except Exception as error:  # offline, missing files, bad id: one clear paragraph, no traceback
            reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
            raise LoadError(
                f"could not load the pipeline {model!r}: {reason}. agentsd tried it as a local folder "
                "(a diffusers pipeline saved with save_pretrained, with a model_index.json) and as a "
                "Hugging Face Hub id (downloaded or from the local cache). Without network access, "
                "download the weights elsewhere (for example `huggingface-cli download "
                f"{DEFAULT_MODEL} --local-dir sd15`) and pass that folder as --model; "
                "--model tiny checks the install with random weights."
            ) from None
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # a benchmark must not black out images
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    return pipe.to(device)


def patch_settings(method: str, ratio: float, **settings) -> dict:
    """apply_patch keywords of a method; checks them (ValueError/TypeError) without a model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "baseline":
        return {}
    if method == "tome":  # ToMeSD: plain token merging, one 2x2 stride for every step (Bolya & Hoffman 2023)
        settings = dict(settings, sx=2, sy=2, agent_ratio=0.0, schedule=None)
    settings = {k: v for k, v in settings.items() if v is not None}
    build_config(ratio=ratio, **settings)
    return dict(settings, ratio=ratio)


def enable_deepcache(pipe, interval: int, branch: int = 0):
    """DeepCache's step caching on `pipe` (Ma et al., "DeepCache", CVPR 2024, through its public package):
    the full UNet every `interval` steps, the cached deep features in between. It composes with
    apply_patch in either order; the helper's disable() removes it. Returns the helper."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"the DeepCache interval must be an int >= 1, got {interval!r}")
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise ImportError("DeepCache is not installed: pip install \"agentsd[deepcache]\"") from None
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)  # branch 0: DeepCache's default for SD
    helper.enable()
    return helper


def patch_pipeline(pipe, settings: dict):
    if settings:
        apply_patch(pipe, **settings)
    return pipe
