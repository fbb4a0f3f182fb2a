"""Tiny random-weight models for the tests, built locally (no downloads)."""

import pytest
import torch

from agentsd.models import TINY_UNET_CONFIGS, tiny_pipeline, unet_from_config

KINDS = ("sd15", "sd21", "sdxl")


def unet_inputs(kind, batch=2, latent=(10, 14), seed=0):
    """(sample, timestep, encoder_hidden_states, extra kwargs) for a tiny UNet call."""
    g = torch.Generator().manual_seed(seed)
    config = TINY_UNET_CONFIGS[kind]
    sample = torch.randn(batch, 4, *latent, generator=g)
    context = torch.randn(batch, 77, config["cross_attention_dim"], generator=g)
    kwargs = {}
    if kind == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[8 * latent[0], 8 * latent[1], 0, 0, 8 * latent[0], 8 * latent[1]]] * batch).float(),
        }
    return sample, torch.tensor(981), context, kwargs


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def unet(kind):
    return unet_from_config(kind, tiny=True).eval()


@pytest.fixture
def sd_pipe():
    return tiny_pipeline("sd15")


@pytest.fixture
def sdxl_pipe():
    return tiny_pipeline("sdxl")


def run_unet(unet, inputs):
    sample, timestep, context, kwargs = inputs
    with torch.no_grad():
        return unet(sample, timestep, context, **kwargs).sample
