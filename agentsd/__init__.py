"""AgentSD for diffusers: token merging plus agent attention in Stable Diffusion UNets, no training."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["apply_patch", "remove_patch", "is_patched", "Stage", "paper_schedule", "__version__"]

# The public names are imported on first use (PEP 562), not here: `import agentsd.cli` must not import
# diffusers, so that `agentsd --help` and argument errors come at once and a torchvision that does not
# match torch (diffusers and transformers import it) is reported in one paragraph, not a traceback.
_HOMES = {"apply_patch": "patch", "remove_patch": "patch", "is_patched": "patch", "Stage": "config",
          "paper_schedule": "config"}  # fmt: skip

if TYPE_CHECKING:
    from .config import Stage, paper_schedule
    from .patch import apply_patch, is_patched, remove_patch


# the submodules that importing them here made attributes of the package (`import agentsd; agentsd.patch`)
_SUBMODULES = {"patch", "config", "attention", "block", "merge", "schedule", "kernels"}


def __getattr__(name):
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOMES) | _SUBMODULES)
