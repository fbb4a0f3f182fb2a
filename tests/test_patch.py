"""apply_patch / remove_patch on tiny UNets: parity with the reference and with tomesd, clean undo."""

import copy
import types

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock

import agentsd
from agentsd.attention import AgentSDAttnProcessor
from agentsd.patch import transformer_blocks
from conftest import DEVICE, run_unet, tiny_unet, unet_inputs
from reference import reference_block_forward

AGENT_STAGE = dict(sx=4, sy=4, agent_ratio=0.95)
TOME_STAGE = dict(sx=2, sy=2, agent_ratio=0.5)
TOP_LEVEL = {"sd15": 1, "sd21": 1, "sdxl": 2}


def reference_unet(unet, latent, stage, ratio, max_downsample):
    """A copy of `unet` whose transformer blocks run the reference."""
    reference = copy.deepcopy(unet)
    settings = dict(stage, ratio=ratio, k_scale2=0.3, k_shortcut=0.075)
    for block in reference.modules():
        if isinstance(block, BasicTransformerBlock):
            block.forward = types.MethodType(
                lambda self, *a, _f=reference_block_forward(block, latent, settings, max_downsample), **k: _f(*a, **k),
                block,
            )
    return reference


@pytest.mark.parametrize("stage", [AGENT_STAGE, TOME_STAGE], ids=["agent", "tome"])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_reference(unet, kind, stage, batch):
    latent = (10, 14)  # level-1 grid 10x14 and level-2 grid 5x7: sx, sy divide neither
    inputs = unet_inputs(kind, batch=batch, latent=latent)
    expected = run_unet(reference_unet(unet, latent, stage, 0.4, TOP_LEVEL[kind]), inputs)
    baseline = run_unet(unet, inputs)
    agentsd.apply_patch(unet, 0.4, **stage, use_rand=False)
    out = run_unet(unet, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - baseline).abs().max() > 1e-3  # the patch changed something


def test_matches_reference_two_levels_fp32_precision():
    unet = tiny_unet("sd15")
    latent = (9, 13)
    inputs = unet_inputs("sd15", latent=latent)
    expected = run_unet(reference_unet(unet, latent, TOME_STAGE, 0.5, max_downsample=2), inputs)
    agentsd.apply_patch(unet, 0.5, **TOME_STAGE, use_rand=False, max_downsample=2, attn_precision="fp32")
    torch.testing.assert_close(run_unet(unet, inputs), expected, rtol=1e-4, atol=1e-4)


def test_plain_tome_matches_tomesd():
    tomesd = pytest.importorskip("tomesd")
    unet = tiny_unet("sd15")
    inputs = unet_inputs("sd15", latent=(16, 12))
    theirs = copy.deepcopy(unet)
    tomesd.apply_patch(theirs, ratio=0.5, sx=2, sy=2, max_downsample=1, use_rand=False)
    agentsd.apply_patch(unet, 0.5, sx=2, sy=2, agent_ratio=0.0, max_downsample=1, use_rand=False)
    torch.testing.assert_close(run_unet(unet, inputs), run_unet(theirs, inputs), rtol=1e-5, atol=1e-5)


def test_ratio_zero_is_the_unpatched_model(unet, kind):
    inputs = unet_inputs(kind)
    baseline = run_unet(unet, inputs)
    agentsd.apply_patch(unet, 0.0, **AGENT_STAGE)
    assert torch.equal(run_unet(unet, inputs), baseline)


def test_remove_patch_restores_exactly(unet, kind):
    inputs = unet_inputs(kind)
    baseline = run_unet(unet, inputs)
    processors = unet.attn_processors
    state = {k: v.clone() for k, v in unet.state_dict().items()}

    agentsd.apply_patch(unet, 0.5, **AGENT_STAGE, merge_crossattn=True, merge_mlp=True)
    patched = unet.state_dict()
    assert patched.keys() == state.keys()
    assert all(torch.equal(patched[k], v) for k, v in state.items())
    assert any(isinstance(block.attn1.processor, AgentSDAttnProcessor) for _, block in transformer_blocks(unet))
    assert not torch.equal(run_unet(unet, inputs), baseline)

    agentsd.remove_patch(unet)
    agentsd.remove_patch(unet)  # twice is harmless
    assert torch.equal(run_unet(unet, inputs), baseline)
    assert all(unet.attn_processors[k] is p for k, p in processors.items())
    assert not agentsd.is_patched(unet)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unet.modules())
    assert not any({"forward", "set_processor", "get_processor"} & m.__dict__.keys() for m in unet.modules())


def test_reapply_replaces_the_old_patch(unet, kind):
    inputs = unet_inputs(kind)
    agentsd.apply_patch(unet, 0.4, **TOME_STAGE, use_rand=False)
    tome = run_unet(unet, inputs)
    agentsd.apply_patch(unet, 0.4, **AGENT_STAGE, use_rand=False)
    agent = run_unet(unet, inputs)
    agentsd.apply_patch(unet, 0.4, **TOME_STAGE, use_rand=False)
    assert torch.equal(run_unet(unet, inputs), tome)
    assert not torch.equal(agent, tome)
    hooks = sum(len(m._forward_pre_hooks) for m in unet.modules())
    assert hooks == 1  # the UNet's: nothing left from earlier patches
    forwards = [b.forward.__self__ for _, b in transformer_blocks(unet) if "forward" in b.__dict__]
    assert len(forwards) == len(transformer_blocks(unet)) and all(f.patch is unet._agentsd for f in forwards)


def test_only_the_merged_levels_merge(unet, kind):
    """Blocks of deeper levels run the lean forward only: no processor of agentsd's, no plan, no hooks."""
    agentsd.apply_patch(unet, 0.5, **AGENT_STAGE)
    merged = merged_blocks(unet)
    assert 0 < len(merged) < len(transformer_blocks(unet))
    for _, block in transformer_blocks(unet):
        assert "forward" in block.__dict__ and bool(block.forward.__self__.users) == (block in merged)
        assert isinstance(block.attn1.processor, AgentSDAttnProcessor) == (block in merged)
        assert not any(m._forward_pre_hooks for m in block.modules())


def merged_blocks(unet):
    return [block for level, block in transformer_blocks(unet) if level <= unet._agentsd.max_downsample]


def test_cross_attention_and_mlp_merging_change_the_output(unet, kind):
    inputs = unet_inputs(kind)
    agentsd.apply_patch(unet, 0.5, **TOME_STAGE, use_rand=False)
    attn_only = run_unet(unet, inputs)
    for flags in (dict(merge_crossattn=True), dict(merge_mlp=True)):
        agentsd.apply_patch(unet, 0.5, **TOME_STAGE, use_rand=False, **flags)
        out = run_unet(unet, inputs)
        assert torch.isfinite(out).all()
        assert (out - attn_only).abs().max() > 1e-4, flags


@pytest.mark.parametrize(
    "flags", [{}, dict(merge_crossattn=True), dict(merge_mlp=True), dict(merge_attn=False, merge_mlp=True)],
    ids=["attn", "crossattn", "mlp", "mlp-only"],
)
def test_plans_are_freed_after_their_last_use(flags):
    """A block's plan dies after its last user, before the feed-forward where a call peaks in memory."""
    unet = tiny_unet("sd15")
    agentsd.apply_patch(unet, 0.5, **TOME_STAGE, **flags)
    patch = unet._agentsd
    blocks = merged_blocks(unet)
    patched = [b.forward.__self__ for b in blocks]  # PatchedBlock.forward
    planned, held_at_ff = [], []
    for block, patched_block in zip(blocks, patched):
        block.attn1.register_forward_pre_hook(lambda *_, m=patched_block: planned.append(m.slot.plan is not None))
        block.ff.register_forward_pre_hook(lambda *_, m=patched_block: held_at_ff.append(m.slot.plan is not None))
    run_unet(unet, unet_inputs("sd15"))
    assert any(planned)  # some blocks were merged
    assert held_at_ff == ([False] * len(blocks) if not flags.get("merge_mlp") else planned)
    assert all(m.slot.plan is None for m in patched)
    assert patch.call.timestep is None


def test_random_destinations_follow_seed_and_timestep(unet, kind):
    sample, _, context, kwargs = unet_inputs(kind)

    def run(seed, timestep, batch=2):
        agentsd.apply_patch(unet, 0.5, **AGENT_STAGE, seed=seed)
        with torch.no_grad():
            return unet(sample[:batch], torch.tensor(timestep, device=sample.device), context[:batch], **_slice(kwargs, batch)).sample

    assert torch.equal(run(0, 981), run(0, 981))  # reproducible from the seed
    assert not torch.equal(run(0, 981), run(1, 981))  # another seed, other destinations
    agentsd.apply_patch(unet, 0.5, **AGENT_STAGE, use_rand=False)
    with torch.no_grad():
        top_left = unet(sample[:1], torch.tensor(981, device=sample.device), context[:1], **_slice(kwargs, 1)).sample
    assert torch.equal(run(0, 981, batch=1), top_left)  # odd batch: no randomness


def _slice(kwargs, batch):
    if "added_cond_kwargs" not in kwargs:
        return kwargs
    return {"added_cond_kwargs": {k: v[:batch] for k, v in kwargs["added_cond_kwargs"].items()}}


def test_a_unet_call_that_raises_leaves_no_call_behind():
    """A UNet call cut short by an error (out of memory in a later block, say) ends as a finished one
    does: its blocks called on their own afterwards run unpatched (they merged with the dead call's
    latent size and stage). Ctrl-C is no Exception: torch runs no hook then, and the next call resets."""
    unet = tiny_unet("sd15")
    _, block = transformer_blocks(unet)[0]
    inputs = unet_inputs("sd15")
    hidden = torch.randn(2, 10 * 14, block.attn1.inner_dim, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("out of memory")

    with torch.no_grad():
        expected = block(hidden, encoder_hidden_states=context)
        agentsd.apply_patch(unet, 0.5, sx=2, sy=2, agent_ratio=0.5, seed=0)
        handle = unet.mid_block.register_forward_hook(out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            run_unet(unet, inputs)
        handle.remove()
        torch.testing.assert_close(block(hidden, encoder_hidden_states=context), expected, rtol=0, atol=0)


def test_block_called_outside_a_unet_call_runs_unpatched():
    """A merged level's block called on its own (no UNet call running in this thread, so no latent
    size or stage) gives the unpatched block's output, before the first UNet call and after one, and
    a UNet call between still merges."""
    unet = tiny_unet("sd15")
    _, block = transformer_blocks(unet)[0]
    inputs = unet_inputs("sd15")  # a 10 x 14 latent: the top level's blocks see 140 tokens, as `hidden`
    hidden = torch.randn(2, 10 * 14, block.attn1.inner_dim, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        expected = block(hidden, encoder_hidden_states=context)
        plain = run_unet(unet, inputs)
        agentsd.apply_patch(unet, 0.5, sx=2, sy=2, agent_ratio=0.5, seed=0)
        torch.testing.assert_close(block(hidden, encoder_hidden_states=context), expected, rtol=0, atol=0)
        assert not torch.equal(run_unet(unet, inputs), plain)
        torch.testing.assert_close(block(hidden, encoder_hidden_states=context), expected, rtol=0, atol=0)
