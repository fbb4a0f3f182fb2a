"""Checked command-line values: argparse types (argparse names the option and exits with code 2) and the
checks of a device and an output folder, shared by `agentsd generate` and `agentsd benchmark`."""

import argparse
import contextlib
import math
import os
from pathlib import Path

SIZE_MULTIPLE = 8  # diffusers' Stable Diffusion pipelines reject other sizes (check_inputs)
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes < 2**64; image i uses seed + i


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def image_size(text: str) -> int:
    value = _int(text)
    if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of {SIZE_MULTIPLE} (Stable Diffusion pipelines need it), got {text}"
        )
    return value


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, 2**63), got {text}")
    return value


def folder(text: str) -> str:
    """An --out: not empty (an unset shell variable, say), which would write into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def guidance_scale(text: str) -> float:
    value = finite_float(text)
    if value < 0:  # diffusers treats every scale <= 1 as "no guidance": a negative one would pass unnoticed
        raise argparse.ArgumentTypeError(f"must be >= 0 (up to 1 turns classifier-free guidance off), got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    for kind in ("cuda", "xpu"):
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            devices += [f"{kind}:{i}" for i in range(module.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str) -> str:
    """`name` if torch can run on it here, else ValueError saying which devices there are."""
    import torch

    devices = available_devices()
    here = ", ".join(devices)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name!r} is not a torch device (cpu, cuda, cuda:N, mps, xpu, ...); "
                         f"this machine has {here}") from None  # fmt: skip
    if device.type == "cpu":
        return name
    if device.type not in {d.split(":")[0] for d in devices}:
        build = " (a CPU build)" if device.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"{name} is not available: torch {torch.__version__}{build} sees no {device.type} device "
                         f"here; this machine has {here}")  # fmt: skip
    if device.index is not None and str(device) not in devices:
        raise ValueError(f"{name} is not available; this machine has {here}")
    return name


def check_output_folder(path: Path) -> None:
    """ValueError unless `path` is a folder or one can be made there; writes nothing."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, so {path} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable")


def make_output_folder(path: Path) -> Path | None:
    """mkdir -p, or ValueError with the reason (a read-only file system, no permission). Returns the
    outermost folder it made (None if `path` was there), for removed_if_failing."""
    outermost, folder = None, path.absolute()
    while not folder.exists():
        outermost, folder = folder, folder.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot make the folder {path}: {error.strerror or error}") from None
    return outermost


@contextlib.contextmanager
def removed_if_failing(path: Path, outermost: Path | None):
    """Around the work that writes into `path`: if it fails (an error, a parser exit, Ctrl-C), undo
    make_output_folder while nothing was written there, so that a failed run leaves no empty folders."""
    try:
        yield
    except BaseException:
        _remove_made_folders(path, outermost)
        raise


def _remove_made_folders(path: Path, outermost: Path | None) -> None:
    folder = path.absolute()
    while outermost is not None and folder.is_relative_to(outermost):
        try:
            folder.rmdir()
        except OSError:  # not empty
            return
        folder = folder.parent
