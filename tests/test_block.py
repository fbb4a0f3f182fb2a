"""block.py: lean_forward computes what diffusers' forward does, and runs only where it may."""

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import agentsd
import agentsd.patch
from agentsd.block import is_lean
from agentsd.patch import transformer_blocks
from conftest import run_unet, tiny_unet, unet_inputs

STAGES = {"agent": dict(ratio=0.5, sx=4, sy=4, agent_ratio=0.95), "tome": dict(ratio=0.5, sx=2, sy=2, agent_ratio=0.5)}
STAGES["unmerged"] = dict(STAGES["agent"], ratio=0.0)  # the plan is None: plain attention in lean_forward


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the calls of lean_forward by patched blocks."""
    calls = []
    lean_forward = agentsd.patch.lean_forward

    def counted(*args, **kwargs):
        calls.append(args[0])
        return lean_forward(*args, **kwargs)

    monkeypatch.setattr(agentsd.patch, "lean_forward", counted)
    return calls


def patched_blocks(unet, merged_only=False):
    """The blocks with agentsd's forward (all of them), or those that merge."""
    return [b for _, b in transformer_blocks(unet) if "forward" in b.__dict__ and (b.forward.__self__.users or not merged_only)]


def randomize_layer_norms(unet):
    """Layer norms start as the identity: random affine parameters tell them apart."""
    g = torch.Generator().manual_seed(0)
    for norm in unet.modules():
        if isinstance(norm, torch.nn.LayerNorm):
            for p in (norm.weight, norm.bias):
                p.data.copy_(1 + torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("stage", STAGES)
def test_lean_forward_equals_diffusers_forward(unet, kind, stage, lean_calls):
    randomize_layer_norms(unet)
    inputs = unet_inputs(kind)
    agentsd.apply_patch(unet, **STAGES[stage], seed=0)
    lean = run_unet(unet, inputs)
    blocks = patched_blocks(unet)
    assert blocks and set(lean_calls) == set(blocks)
    for block in blocks:  # the forward each patch replaced, and attention through AttnProcessor2_0
        block.forward.__self__.lean = False
        block.attn1.processor.plain = False
    lean_calls.clear()
    assert torch.equal(run_unet(unet, inputs), lean)  # bit for bit
    assert not lean_calls


def _set_attn2_processor(blocks):
    for block in blocks:
        block.attn2.set_processor(AttnProcessor())


def _hook_attn2(blocks):
    for block in blocks:
        block.attn2.register_forward_hook(lambda *args: None)


def _chunk_feed_forward(blocks):
    for block in blocks:
        block.set_chunk_feed_forward(2, dim=1)


CHANGES = {"attn2 processor": _set_attn2_processor, "hook": _hook_attn2, "chunked feed-forward": _chunk_feed_forward}


@pytest.mark.parametrize("change", CHANGES)
def test_changed_blocks_run_diffusers_forward(change, lean_calls):
    """What a user changes after apply_patch takes the block back to diffusers' forward, which honours it."""
    unet = tiny_unet("sd15")
    inputs = unet_inputs("sd15")
    agentsd.apply_patch(unet, **STAGES["tome"], seed=0)
    lean = run_unet(unet, inputs)
    changed = patched_blocks(unet, merged_only=True)
    CHANGES[change](changed)
    lean_calls.clear()
    torch.testing.assert_close(run_unet(unet, inputs), lean, rtol=1e-5, atol=1e-5)  # the same math, other steps
    assert lean_calls and not set(lean_calls) & set(changed)  # the other blocks still run lean


def test_calls_with_cross_attention_kwargs_run_diffusers_forward(lean_calls):
    unet = tiny_unet("sd15")
    sample, timestep, context, _ = unet_inputs("sd15")
    agentsd.apply_patch(unet, **STAGES["agent"], seed=0)
    with torch.no_grad():
        lean = unet(sample, timestep, context).sample
        lean_calls.clear()
        out = unet(sample, timestep, context, cross_attention_kwargs={"ip_adapter_masks": None}).sample
    torch.testing.assert_close(out, lean, rtol=1e-5, atol=1e-5)
    assert not lean_calls


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
def test_a_processor_set_after_the_patch_goes_beneath_agentsd(processor, lean_calls):
    """agentsd stays on over it; lean_forward runs where it computes what the processor does."""
    unet = tiny_unet("sd15")
    inputs = unet_inputs("sd15")
    agentsd.apply_patch(unet, **STAGES["agent"], seed=0)
    patched = run_unet(unet, inputs)
    unet.set_attn_processor(processor())
    lean_calls.clear()
    torch.testing.assert_close(run_unet(unet, inputs), patched, rtol=1e-5, atol=1e-5)
    assert bool(lean_calls) == (processor is AttnProcessor2_0)
    assert all(type(p) is processor for p in unet.attn_processors.values())  # what diffusers sees


@pytest.mark.parametrize(
    "settings, lean",
    [
        ({}, True),
        (dict(activation_fn="gelu"), False),
        (dict(only_cross_attention=True), False),
        (dict(dropout=0.1), False),
        (dict(norm_type="ada_norm", num_embeds_ada_norm=10), False),
        (dict(upcast_attention=True), True),  # AttnProcessor2_0 ignores it
    ],
)
def test_which_blocks_are_lean(settings, lean):
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, **settings)
    assert is_lean(block) == lean
