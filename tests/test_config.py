"""Bad input: a clear error that names the parameter, and the model left as it was."""

import pytest
import torch
from diffusers import StableDiffusionXLAutoBlocks, UNet2DModel, UNetControlNetXSModel, UNetMotionModel

import agentsd
from agentsd.models import unet_from_config
from conftest import run_unet, unet_inputs

FIXED = dict(sx=2, sy=2, agent_ratio=0.5)

BAD = [
    (dict(ratio=1.0), ValueError, "ratio must be in \\[0, 1\\)"),
    (dict(ratio=-0.1), ValueError, "ratio must be in"),
    (dict(ratio="0.4"), TypeError, "ratio must be a number"),
    (dict(ratio=float("nan")), ValueError, "ratio must be finite"),
    (dict(sx=0, sy=2, agent_ratio=0.5), ValueError, "sx must be a positive integer"),
    (dict(sx=2, sy=2.5, agent_ratio=0.5), ValueError, "sy must be a positive integer"),
    (dict(sx=True, sy=2, agent_ratio=0.5), ValueError, "sx must be a positive integer"),
    (dict(sx=2, sy=2, agent_ratio=1.5), ValueError, "agent_ratio must be in"),
    (dict(sx=2, sy=2), ValueError, "missing: agent_ratio"),
    (dict(agent_ratio=0.9), ValueError, "missing: sx, sy"),
    (dict(schedule=[dict(end=1.0, sx=2, sy=2, agent_ratio=0.5)], sx=2), ValueError, "either `schedule`"),
    (dict(schedule=[]), TypeError, "schedule must be a non-empty list"),
    (dict(schedule="paper"), TypeError, "schedule must be a non-empty list"),
    (dict(schedule=[dict(end=0.5, sx=2, sy=2, agent_ratio=0.5)]), ValueError, "last must be 1.0"),
    (dict(schedule=[dict(end=0.6, sx=2, sy=2, agent_ratio=0.5), dict(end=0.4, sx=2, sy=2, agent_ratio=0.5)]),
     ValueError, "rise strictly"),
    (dict(schedule=[dict(end=1.0, sx=2, sy=2)]), ValueError, "missing: \\['agent_ratio'\\]"),
    (dict(schedule=[dict(end=1.0, sx=2, sy=2, agent_ratio=0.5, stride=3)]), ValueError, "unknown: \\['stride'\\]"),
    (dict(schedule=[dict(end=1.0, sx=-1, sy=2, agent_ratio=0.5)]), ValueError, "sx must be a positive integer"),
    (dict(schedule=[(1.0, 2, 2, 0.5)]), TypeError, "schedule\\[0\\] must be an agentsd.Stage"),
    (dict(attn_precision="fp16"), ValueError, "attn_precision must be one of \\(None, 'fp32'\\)"),
    (dict(max_downsample=3), ValueError, "max_downsample must be None or one of \\(1, 2, 4, 8\\)"),
    (dict(use_rand=1), TypeError, "use_rand must be True or False"),
    (dict(merge_mlp="yes"), TypeError, "merge_mlp must be True or False"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=None), TypeError, "seed must be an int"),
    (dict(k_scale2=None), TypeError, "k_scale2 must be a number"),
    (dict(k_scale2=-0.1), ValueError, "k_scale2 must be in \\[0, 1\\]"),
    (dict(k_scale2=1.5), ValueError, "k_scale2 must be in \\[0, 1\\]"),
    (dict(k_shortcut=-0.01), ValueError, "k_shortcut must be in \\[0, 1\\]"),
    (dict(k_shortcut=2), ValueError, "k_shortcut must be in \\[0, 1\\]"),
    (dict(scheduler=object()), TypeError, "scheduler must be a diffusers scheduler"),
]


# ids without object addresses: pytest-xdist's workers must collect the same names
@pytest.mark.parametrize("kwargs, error, message", BAD, ids=[str(b[0]).split(" at 0x")[0] for b in BAD])
def test_bad_arguments_leave_the_patch_as_it_was(kwargs, error, message):
    unet = unet_from_config("sd15", tiny=True).eval()
    inputs = unet_inputs("sd15")
    agentsd.apply_patch(unet, 0.5, **FIXED, use_rand=False)
    before = run_unet(unet, inputs)
    args = {**({} if set(kwargs) & {"sx", "sy", "agent_ratio", "schedule"} else FIXED), **kwargs}
    with pytest.raises(error, match=message):
        agentsd.apply_patch(unet, **args)
    assert torch.equal(run_unet(unet, inputs), before)  # the earlier patch still stands, whole


def test_bad_arguments_leave_an_unpatched_model_alone():
    unet = unet_from_config("sd15", tiny=True).eval()
    with pytest.raises(ValueError):
        agentsd.apply_patch(unet, ratio=2.0, **FIXED)
    assert not agentsd.is_patched(unet)
    assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in unet.modules())


def test_unsupported_models(sd_pipe):
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.apply_patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        agentsd.apply_patch(UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                                        up_block_types=("UpBlock2D",) * 2, norm_num_groups=8))
    # AnimateDiff's and ControlNet-XS's UNets have BasicTransformerBlocks but are no UNet2DConditionModel
    motion = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                             motion_num_attention_heads=2, motion_max_seq_length=8,
                             down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                             up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))  # fmt: skip
    controlnet_xs = UNetControlNetXSModel(
        sample_size=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(4, 8), cross_attention_dim=8, num_attention_heads=2, norm_num_groups=4,
        ctrl_block_out_channels=[2, 4], ctrl_num_attention_heads=4, ctrl_max_norm_num_groups=2,
        ctrl_conditioning_embedding_out_channels=(2, 2),
    )  # fmt: skip
    for unet in (motion, controlnet_xs):
        with pytest.raises(TypeError, match=f"got {type(unet).__name__}"):
            agentsd.apply_patch(unet)
        assert all(not m._forward_pre_hooks and "forward" not in m.__dict__ for m in unet.modules())
        # nothing to undo: harmless, as for any model that is not patched (they raised)
        assert agentsd.remove_patch(unet) is unet and not agentsd.is_patched(unet)
    sd_pipe.unet = None  # like a transformer-based pipeline (SD3, Flux): no UNet
    with pytest.raises(TypeError, match="StableDiffusionPipeline has no .unet, models: vae=AutoencoderKL"):
        agentsd.apply_patch(sd_pipe)
    assert agentsd.remove_patch(sd_pipe) is sd_pipe and not agentsd.is_patched(sd_pipe)
    modular = StableDiffusionXLAutoBlocks().init_pipeline()  # its components not loaded yet
    with pytest.raises(TypeError, match=r"has no .unet \(a modular pipeline loads it with load_components"):
        agentsd.apply_patch(modular)
    for not_a_model in ("unet", None):
        with pytest.raises(TypeError, match="UNet2DConditionModel"):
            agentsd.remove_patch(not_a_model)


# UNet2DConditionModels whose attention is not in transformer blocks: plain ResNets (the x2 latent
# upscaler's K blocks are alike), and Kandinsky 2.x's and DeepFloyd IF's attention with added K/V
# (the configs of diffusers' Kandinsky 2.2 tests)
NO_TRANSFORMER_BLOCKS = {
    "DownBlock2D": dict(down_block_types=["DownBlock2D"] * 4, up_block_types=["UpBlock2D"] * 4, mid_block_type=None),
    "ResnetDownsampleBlock2D, SimpleCrossAttnDownBlock2D": dict(
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"], block_out_channels=(32, 64),
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        attention_head_dim=4, resnet_time_scale_shift="scale_shift"),
}  # fmt: skip


@pytest.mark.parametrize("kinds", NO_TRANSFORMER_BLOCKS)
def test_unet_without_transformer_blocks(kinds):
    unet = unet_from_config("sd15", tiny=True)
    plain = type(unet)(**{**unet.config, **NO_TRANSFORMER_BLOCKS[kinds]})
    with pytest.raises(ValueError, match=f"no transformer blocks .*; its down blocks: {kinds}$"):
        agentsd.apply_patch(plain, **FIXED)
    assert not agentsd.is_patched(plain)


def test_default_schedule_values():
    unet = unet_from_config("sdxl", tiny=True)
    agentsd.apply_patch(unet, sx=4, sy=4, agent_ratio=0.95)
    assert unet._agentsd.max_downsample == 2  # SDXL's top level has no transformer blocks
    unet = unet_from_config("sd15", tiny=True)
    agentsd.apply_patch(unet, sx=4, sy=4, agent_ratio=0.95)
    assert unet._agentsd.max_downsample == 1
    stages = agentsd.paper_schedule(0.3)
    assert [(s.end, s.sx, s.agent_ratio, s.ratio) for s in stages] == [(0.4, 4, 0.95, 0.3), (1.0, 2, 0.5, 0.3)]


def test_the_default_seed_is_the_same_whatever_torchs_seed_and_draws_nothing(sd_pipe):
    """Images follow the pipeline's generator alone, as unpatched: torch's own seed (random in every
    fresh process) does not pick the destinations, and patching draws nothing from torch's generator."""
    sd_pipe.set_progress_bar_config(disable=True)
    images = []
    for torch_seed in (123, 456):
        torch.manual_seed(torch_seed)
        expected = torch.rand(3)
        torch.manual_seed(torch_seed)
        agentsd.apply_patch(sd_pipe, ratio=0.5, min_tokens=0)
        with pytest.raises(ValueError):
            agentsd.apply_patch(sd_pipe, ratio=2.0, min_tokens=0)
        assert torch.equal(torch.rand(3), expected)
        images.append(sd_pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                              generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    assert torch.equal(*images)
    agentsd.remove_patch(sd_pipe)
    unpatched = sd_pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert not torch.equal(images[0], unpatched)  # merging was on: the destinations mattered


def test_a_pipeline_without_a_scheduler_patches(sd_pipe):
    del sd_pipe.scheduler  # a pipeline class of the user's that has none
    agentsd.apply_patch(sd_pipe, **FIXED)
    assert agentsd.is_patched(sd_pipe)


def test_every_parameter_is_documented():
    import inspect

    doc = agentsd.apply_patch.__doc__
    for name in inspect.signature(agentsd.apply_patch).parameters:
        assert f"{name}:" in doc or f"{name}, " in doc or f", {name}:" in doc, name


def test_blocks_below_min_tokens_are_not_merged():
    """The default rule: a level whose blocks see fewer than min_tokens runs unmerged (bit for bit);
    at or above it, it merges."""
    unet = unet_from_config("sd15", tiny=True).eval()
    inputs = unet_inputs("sd15", latent=(10, 14))  # 140 tokens at the top level
    baseline = run_unet(unet, inputs)
    agentsd.apply_patch(unet, **FIXED, min_tokens=141)
    assert torch.equal(run_unet(unet, inputs), baseline)
    agentsd.apply_patch(unet, **FIXED, min_tokens=140)
    assert not torch.equal(run_unet(unet, inputs), baseline)
    agentsd.apply_patch(unet, **FIXED, min_tokens=None)
    assert unet._agentsd.config.min_tokens == agentsd.config.MIN_TOKENS
    with pytest.raises(ValueError, match="min_tokens must be None or an int >= 0"):
        agentsd.apply_patch(unet, **FIXED, min_tokens=-1)
