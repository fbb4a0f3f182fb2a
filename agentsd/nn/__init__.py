"""Agent attention outside Stable Diffusion: the op (and, later, trainable layers)."""

from . import functional

__all__ = ["functional"]
