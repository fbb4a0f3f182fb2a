"""Kernel configs that autotuning chose, kept on disk, so that a new process at a size seen before
does not tune again (tuning compiles and times every candidate: 10-20 s at a new size).

One small JSON file per (GPU, kernels source, kernel, shape and dtype), in the user's cache folder
(`AGENTSD_CACHE_DIR`, else `$XDG_CACHE_HOME/agentsd`, else `~/.cache/agentsd`). A file is written
whole to a temporary name and renamed into place, so two processes that tune at once never leave a
torn file: the last rename wins, and both chose a valid config. A folder that cannot be written only
means tuning again next time.

Configs tuned on the GPUs agentsd is measured on ship with the package (`data/kernel_configs/`, one
JSON file per GPU model, written by `scripts/collect_kernel_configs.py`), so that on those GPUs even
the first process on a new machine does not tune at the common sizes; a model without a table of
its own reads that of a model of the same architecture. They are read after the user's cache, and
only while they were tuned for this very source of the kernels.
"""

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import torch

from .files import write_whole

_KERNELS = Path(__file__).with_name("kernels")  # the package whose source a config was tuned for
SHIPPED = Path(__file__).with_name("data") / "kernel_configs"


def cache_dir() -> Path:
    if os.environ.get("AGENTSD_CACHE_DIR"):
        return Path(os.environ["AGENTSD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "agentsd"


def gpu_name(device: torch.device) -> str:
    """The GPU model configs are kept for, as a file name."""
    if device.type != "cuda":
        return "interpreter"  # Triton's interpreter
    major, minor = torch.cuda.get_device_capability(device)
    return _safe(f"{torch.cuda.get_device_name(device)}-sm{major}{minor}")


def _gpu_folder(device: torch.device) -> Path:
    return cache_dir() / "kernel-configs" / gpu_name(device)


def _folder(device: torch.device, kernel: str) -> Path:
    """Configs of `kernel` for this GPU model and this version of the kernels' source."""
    return _gpu_folder(device) / f"{kernel}-{_source_hash()}"


def _source_hash() -> str:
    """Of the kernels package's files, sorted by name and concatenated: any change anywhere tunes anew."""
    digest = hashlib.sha256()
    for path in sorted(_KERNELS.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _key_name(key: tuple) -> str:
    return _safe("-".join(map(str, key)))


def _file(device: torch.device, kernel: str, key: tuple) -> Path:
    return _folder(device, kernel) / (_key_name(key) + ".json")


def load(device: torch.device, kernel: str, key: tuple) -> dict | None:
    """The config stored for `key`, as Triton's Config.all_kwargs() gave it (the user's cache first,
    then the package's), or None."""
    try:
        return json.loads(_file(device, kernel, key).read_text())
    except (OSError, ValueError):
        return shipped(gpu_name(device)).get(f"{kernel}/{_key_name(key)}")


@functools.cache
def shipped(gpu: str) -> dict:
    """{"kernel/key": config} shipped for this GPU model and this source of the kernels; else those of
    another model of the same architecture (the name's -smXY), else {}.

    Models of one architecture share the per-block limits a config must fit (shared memory,
    registers); the H200's own tuning picked the H100's config at 25 of 28 keys, the other three
    within 6 us per call (docs/performance.md): so a sibling's table is worth more to, say, an H100
    PCIe user than tuning anew, which cost the first process 28 s at SD 1.5 1024 on an H100."""
    own = SHIPPED / f"{gpu}.json"
    siblings = sorted(SHIPPED.glob(f"*-{gpu.rsplit('-', 1)[-1]}.json")) if "-sm" in gpu else []
    for path in [own, *(p for p in siblings if p != own)]:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if table.get("source") == _source_hash():
            return table["configs"]
    return {}


def collected(device: torch.device) -> dict:
    """The package's table for this GPU model, from the configs in the user's cache for this source
    (what scripts/collect_kernel_configs.py writes to data/kernel_configs/)."""
    suffix = f"-{_source_hash()}"
    configs = {
        f"{path.parent.name.removesuffix(suffix)}/{path.stem}": json.loads(path.read_text())
        for path in sorted(_gpu_folder(device).glob(f"*{suffix}/*.json"))
    }
    return {"gpu": gpu_name(device), "source": _source_hash(), "configs": configs}


def store(device: torch.device, kernel: str, key: tuple, config: dict) -> None:
    path = _file(device, kernel, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, json.dumps(config))
    except OSError:
        pass


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
