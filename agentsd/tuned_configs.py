"""Kernel configs that autotuning chose, kept on disk, so that a new process at a size seen before
does not tune again (tuning compiles and times every candidate: 10-20 s at a new size).

One small JSON file per (GPU, kernels source, kernel, shape and dtype), in the user's cache folder
(`AGENTSD_CACHE_DIR`, else `$XDG_CACHE_HOME/agentsd`, else `~/.cache/agentsd`). A file is written
whole to a temporary name and renamed into place, so two processes that tune at once never leave a
torn file: the last rename wins, and both chose a valid config. A folder that cannot be written only
means tuning again next time.
"""

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from .files import write_whole

_KERNELS = Path(__file__).with_name("kernels")  # the package whose source a config was tuned for


def cache_dir() -> Path:
    if os.environ.get("AGENTSD_CACHE_DIR"):
        return Path(os.environ["AGENTSD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentsd"


def _folder(device: torch.device, kernel: str) -> Path:
    """Configs of `kernel` for this GPU model and this version of the kernels' source."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{name}-sm{major}{minor}"
    else:  # Triton's interpreter
        gpu = "interpreter"
    source = _source_hash()
    return cache_dir() / "kernel-configs" / _safe(gpu) / f"{kernel}-{source}"


def _source_hash() -> str:
    """Of the kernels package's files, sorted by name and concatenated: any change anywhere tunes anew."""
    digest = hashlib.sha256()
    for path in sorted(_KERNELS.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _file(device: torch.device, kernel: str, key: tuple) -> Path:
    return _folder(device, kernel) / (_safe("-".join(map(str, key))) + ".json")


def load(device: torch.device, kernel: str, key: tuple) -> dict | None:
    """The config stored for `key`, as Triton's Config.all_kwargs() gave it, or None."""
    try:
        return json.loads(_file(device, kernel, key).read_text())
    except (OSError, ValueError):
        return None


def store(device: torch.device, kernel: str, key: tuple, config: dict) -> None:
    path = _file(device, kernel, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(config))
    except OSError:
        pass


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
