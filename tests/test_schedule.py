"""Which stage each UNet call uses, for several schedulers, step counts, img2img and scheduler swaps."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)

import agentsd
from agentsd.config import Stage, paper_schedule
from agentsd.schedule import stage_at, timestep_index

SCHEDULERS = {
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
    "dpm++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
}


def record_stages(pipe):
    """The stage index each later UNet call of `pipe` uses (0: agent stage, 1: ToMe stage)."""
    patch = pipe.unet._agentsd
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(patch.config.stages.index(patch.stage)))
    return calls


def generate(pipe, steps, **kwargs):
    kwargs.setdefault("prompt", "a photo of a cat")
    pipe(num_inference_steps=steps, height=32, width=32, output_type="latent", **kwargs)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps, agent_calls", [(10, 4), (25, 10), (50, 20)])
def test_first_40_percent_use_agents(sd_pipe, name, steps, agent_calls):
    sd_pipe.scheduler = SCHEDULERS[name](sd_pipe.scheduler.config)
    agentsd.apply_patch(sd_pipe)
    calls = record_stages(sd_pipe)
    generate(sd_pipe, steps)
    assert calls == [0] * agent_calls + [1] * (steps - agent_calls)
    calls.clear()
    generate(sd_pipe, steps)  # a second call starts over
    assert calls == [0] * agent_calls + [1] * (steps - agent_calls)


def test_multi_entry_schedulers(sd_pipe):
    # PNDM (the SD 1.5 default, the paper's PLMS) has 51 timesteps for 50 steps; Heun two per step.
    agentsd.apply_patch(sd_pipe)
    calls = record_stages(sd_pipe)
    generate(sd_pipe, 50)
    assert calls == [0] * 21 + [1] * 30  # entries 0..20 lie below 0.4 * 51
    sd_pipe.scheduler = HeunDiscreteScheduler.from_config(sd_pipe.scheduler.config)  # swapped after patching
    calls.clear()
    generate(sd_pipe, 10)
    assert calls == [0] * 8 + [1] * 11  # 19 entries: the first 4 steps use agents


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("strength, expected", [(0.5, [1] * 25), (0.8, [0] * 10 + [1] * 30)])
def test_img2img_starts_where_strength_puts_it(sd_pipe, name, strength, expected):
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.scheduler = SCHEDULERS[name](sd_pipe.scheduler.config)
    agentsd.apply_patch(pipe)
    calls = record_stages(pipe)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    generate(pipe, 50, image=image, strength=strength)
    assert calls == expected


def test_bare_unet_follows_the_given_scheduler(sd_pipe):
    scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    with pytest.raises(ValueError, match="scheduler="):
        agentsd.apply_patch(sd_pipe.unet)
    agentsd.apply_patch(sd_pipe.unet, scheduler=scheduler)
    calls = record_stages(sd_pipe)
    scheduler.set_timesteps(5)
    latents = torch.randn(2, 4, 4, 4)
    context = torch.randn(2, 77, 32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            sd_pipe.unet(scheduler.scale_model_input(latents, t), t, context)
    assert calls == [0, 0, 1, 1, 1]
    agentsd.remove_patch(sd_pipe.unet)
    assert "scale_model_input" not in scheduler.__dict__


def test_remove_patch_unwraps_pipeline(sd_pipe):
    agentsd.apply_patch(sd_pipe)
    assert "progress_bar" in sd_pipe.__dict__ and "scale_model_input" in sd_pipe.scheduler.__dict__
    agentsd.remove_patch(sd_pipe)
    assert "progress_bar" not in sd_pipe.__dict__ and "scale_model_input" not in sd_pipe.scheduler.__dict__


def test_custom_schedule_and_stage_at():
    stages = (Stage(end=0.25, sx=2, sy=2, agent_ratio=0.9, ratio=0.3), Stage(end=1.0, sx=1, sy=1, agent_ratio=0.0, ratio=0.3))
    assert stage_at(stages, 0.0) is stages[0]
    assert stage_at(stages, 0.2499) is stages[0]
    assert stage_at(stages, 0.25) is stages[1]
    assert stage_at(paper_schedule(0.4), 0.39).sx == 4 and stage_at(paper_schedule(0.4), 0.4).sx == 2


def test_timestep_index_reads_views_only():
    timesteps = torch.arange(10, 0, -1)
    assert [timestep_index(t, timesteps) for t in timesteps[3:6]] == [3, 4, 5]
    assert timestep_index(timesteps[4].clone(), timesteps) is None
    assert timestep_index(7, timesteps) is None
