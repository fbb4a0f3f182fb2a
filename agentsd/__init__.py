"""AgentSD for diffusers: token merging plus agent attention in Stable Diffusion UNets, no training."""

from .config import Stage, paper_schedule
from .patch import apply_patch, is_patched, remove_patch

__version__ = "0.1.0"
__all__ = ["apply_patch", "remove_patch", "is_patched", "Stage", "paper_schedule", "__version__"]
