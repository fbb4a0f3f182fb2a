"""What the installed packages are, and whether they work together: checked before diffusers is imported."""

import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The versions a result depends on, to record beside it."""
    import torch

    from . import __version__

    names = ("torchvision", "diffusers", "transformers", "accelerate", "torchmetrics", "torch-fidelity")
    # torch's own string names its build (+cpu, +cu130), which its package metadata leaves out
    return {"python": sys.version.split()[0], "agentsd": __version__, "torch": torch.__version__,
            **{name: package_version(name) for name in names}}  # fmt: skip


def torchvision_problem() -> str | None:
    """Why an installed torchvision cannot be imported, in one paragraph; None when it works or is absent.

    transformers and diffusers import torchvision whenever it is installed, so a torchvision built for
    another torch (PyPI's CUDA builds beside a CPU torch: "operator torchvision::nms does not exist")
    breaks every pipeline, deep inside their lazy imports."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # RuntimeError for the missing operators, ImportError or OSError for the binaries
        import torch

        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        installed = " ".join(filter(None, ["torchvision", package_version("torchvision")]))
        return (
            f"{installed} is installed but does not work with torch {torch.__version__} "
            f"({type(error).__name__}: {reason}); transformers and diffusers import it, so no pipeline can load. "
            "Install the torchvision built for this torch, from the same place as torch (a CPU torch needs the CPU "
            "torchvision: `pip install torchvision --index-url https://download.pytorch.org/whl/cpu`), or a torch and "
            "torchvision released together (for example `pip install torch==2.14.1 torchvision==0.29.1`), or remove it "
            "(`pip uninstall torchvision`): agentsd needs it only for FID (the `fid` extra)."
        )
    return None
