"""Loading a pipeline by name, choosing its scheduler, and patching it by method: what the command
line and the FID benchmark share."""

import warnings
from pathlib import Path

import torch

from .config import build_config

# diffusers is imported where it is used: `agentsd --help` and argument errors then come at once, and a
# torchvision that does not match torch (transformers imports it) is reported before diffusers trips on it.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TINY_MODELS = {"tiny": "sd15", "tiny-sdxl": "sdxl"}
# deepcache: DeepCache's step caching alone; agentsd+deepcache: both (the speed-ups multiply)
METHODS = ("baseline", "tome", "agentsd", "deepcache", "agentsd+deepcache")
UNPATCHED_METHODS = ("baseline", "deepcache")  # agentsd's settings do not apply to them
DEEPCACHE_INTERVAL = 3  # DeepCache's own example setting for Stable Diffusion (cache_interval=3, branch 0)
SCHEDULERS = {  # name on the command line: diffusers class
    "pndm": "PNDMScheduler",  # PLMS, the papers' sampler and SD 1.5's default
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class LoadError(Exception):
    """A pipeline that could not be loaded; the message says what was tried and what to do."""


def resolve_device(device: str | None = None, dtype: torch.dtype | None = None) -> tuple[str, torch.dtype]:
    """What is not given: CUDA when present; float16 on CUDA, float32 elsewhere."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.float16 if device.startswith("cuda") else torch.float32)


def load_pipeline(model: str, *, dtype: torch.dtype | None = None, device: str | None = None, scheduler: str | None = None):
    """A hub id or local folder as DiffusionPipeline.from_pretrained takes it, or "tiny"/"tiny-sdxl";
    device and dtype default as resolve_device chooses."""
    import diffusers
    from diffusers import DiffusionPipeline

    from .models import tiny_pipeline

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
            raise LoadError(load_failure(model, error)) from None
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # a benchmark must not black out images
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    return pipe.to(device)


def load_failure(model: str, error: Exception) -> str:
    """What was tried for `model` and what to do, from the error of DiffusionPipeline.from_pretrained."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    root = _root_cause(error)
    reason = f"{type(root).__name__}: {_first_line(root)}"
    tiny = "--model tiny checks the install with random weights."
    folder = Path(model).expanduser()
    if folder.is_file():
        return (f"could not load --model {model}: it is a file; --model takes a diffusers pipeline folder (with "
                f"a model_index.json, as save_pretrained writes it) or a Hugging Face Hub id. {tiny}")  # fmt: skip
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            return (f"could not load --model {model}: the folder has no model_index.json, so it is not a diffusers "
                    f"pipeline saved with save_pretrained (or downloaded with `hf download`). {tiny}")  # fmt: skip
        return f"could not load the pipeline folder {model}: {reason}. {tiny}"
    try:
        validate_repo_id(model)
    except HFValidationError:
        return (f"could not load --model {model}: there is no such folder, and it is not a Hugging Face Hub id "
                f"(owner/name). {tiny}")  # fmt: skip
    chain = _causes(error)
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (f"could not load --model {model}: the model is gated on the Hugging Face Hub; accept its terms on its "
                f"page and log in with `hf auth login`. {tiny}")  # fmt: skip
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (f"could not load --model {model}: there is no such folder, and the Hugging Face Hub has no model of "
                f"that name (or it is private: log in with `hf auth login`). {tiny}")  # fmt: skip
    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        cache = constants.HF_HUB_CACHE
        return f"could not load --model {model} from the Hugging Face cache ({cache}): {reason}. {tiny}"
    # the network error underneath, not diffusers' own advice about local_files_only and stack traces
    underneath = f" ({reason})" if root is not error else ""
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else underneath
    return (
        f"could not load --model {model}: there is no such folder, it is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and it could not be downloaded{offline}. Download it where the Hub can be "
        f"reached (`hf download {model} --local-dir FOLDER`, from huggingface_hub), copy the folder here and "
        f"pass --model FOLDER. {tiny}"
    )


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def _root_cause(error: BaseException) -> BaseException:
    return _causes(error)[-1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else "no message"


def patch_settings(method: str, ratio: float, **settings) -> dict:
    """apply_patch keywords of a method; checks them (ValueError/TypeError) without a model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in UNPATCHED_METHODS:
        return {}
    if method == "tome":  # ToMeSD: plain ToMe, one stride for every step, 2x2 unless given (Bolya & Hoffman 2023)
        if settings.get("agent_ratio"):
            raise ValueError(f"agent_ratio must be 0 with method 'tome' (plain ToMe), got {settings['agent_ratio']}; "
                             "agents: method 'agentsd'")  # fmt: skip
        stride = dict(sx=settings.get("sx") or 2, sy=settings.get("sy") or 2)
        settings = dict(settings, **stride, agent_ratio=0.0, schedule=None)
    settings = {k: v for k, v in settings.items() if v is not None}
    build_config(ratio=ratio, **settings)
    return dict(settings, ratio=ratio)


def enable_deepcache(pipe, interval: int, branch: int = 0):
    """DeepCache's step caching on `pipe` (Ma et al., "DeepCache", CVPR 2024, through its public package):
    the full UNet every `interval` steps, the cached deep features in between. It composes with
    apply_patch in either order; the helper's disable() removes it. Returns the helper."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"the DeepCache interval must be an int >= 1, got {interval!r}")
    check_deepcache_installed()
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)  # branch 0: DeepCache's default for SD
    helper.enable()
    return helper


def pipeline_stopped(error: ValueError, height: int, width: int, steps: int, scheduler) -> str:
    """The message of a ValueError from the pipeline's own checks, for what agentsd does not check first
    (a latent too small for the model, say), with the settings that led there."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"the pipeline stopped at --height {height} --width {width} --steps {steps} ({type(scheduler).__name__}): {reason}"


def max_steps(scheduler) -> int:
    """The most denoising steps every scheduler here can take: its training timesteps less one. With
    SD's steps_offset=1, diffusers' PNDM, DDIM, DPM++ and UniPC fail at all 1000 (a timestep of 1000
    indexes past alphas_cumprod; diffusers 0.42.1, with or without agentsd)."""
    return scheduler.config.num_train_timesteps - 1


def uses_deepcache(method: str) -> bool:
    return method.endswith("deepcache")


def check_deepcache_installed() -> None:
    """ImportError with the install command when DeepCache is missing (before any model is loaded)."""
    import importlib.util

    if importlib.util.find_spec("DeepCache") is None:
        raise ImportError('DeepCache is not installed: pip install "agentsd[deepcache]"')


def check_text_to_image(pipe) -> None:
    """TypeError unless `pipe` makes images from prompts with a UNet2DConditionModel, what every method
    here runs (the baseline too: the image sizes and the metadata are a Stable Diffusion UNet's)."""
    import inspect

    from .patch import find_unet

    find_unet(pipe)
    if "image" in inspect.signature(pipe.__call__).parameters:
        raise TypeError(f"{type(pipe).__name__} takes an input image (img2img, inpainting, ControlNet); give a "
                        "text-to-image pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline)")  # fmt: skip


def patch_pipeline(pipe, settings: dict, deepcache: int | None = None):
    """apply_patch with `settings` (none: not patched), then DeepCache at interval `deepcache` (None:
    without); unpatch_pipeline undoes both."""
    from .patch import apply_patch

    if settings:
        apply_patch(pipe, **settings)
    if deepcache is not None:
        pipe._deepcache = enable_deepcache(pipe, deepcache)
    return pipe


def unpatch_pipeline(pipe):
    from .patch import remove_patch

    helper = pipe.__dict__.pop("_deepcache", None)
    if helper is not None:
        helper.disable()
    remove_patch(pipe)
    return pipe
