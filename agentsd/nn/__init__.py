"""Agent attention outside Stable Diffusion: the op (`agentsd.nn.functional.agent_attention`, which the
Stable Diffusion patch uses too) and trainable layers."""

from . import functional
from .layers import AgentSelfAttention, AgentTransformer

__all__ = ["functional", "AgentSelfAttention", "AgentTransformer"]
