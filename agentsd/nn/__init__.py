"""Agent attention outside Stable Diffusion: the op (`agentsd.nn.functional.agent_attention`, which the
Stable Diffusion patch uses too) and trainable layers, a drop-in for agent-attention-pytorch 0.1.7."""

from . import functional
from .layers import AgentSelfAttention
from .transformer import AgentTransformer

__all__ = ["functional", "AgentSelfAttention", "AgentTransformer"]
