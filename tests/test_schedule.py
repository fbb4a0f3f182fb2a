"""Which stage each UNet call uses: for every scheduler, step count, img2img, swapped and shared schedulers."""

import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    TCDScheduler,
)

import agentsd
from agentsd.config import Stage, paper_schedule
from agentsd.schedule import list_position, stage_at, trajectory_fraction

SCHEDULERS = {
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
    "dpm++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
}


def record_stages(unet):
    """The stage index each later call of `unet` uses (0: agent stage, 1: ToMe stage), read after the
    patch's own pre-hook has set it."""
    patch = unet._agentsd
    calls = []
    unet.register_forward_pre_hook(lambda *_: calls.append(patch.call.stage_index))
    return calls


def generate(pipe, steps, **kwargs):
    kwargs.setdefault("prompt", "a photo of a cat")
    pipe(num_inference_steps=steps, height=32, width=32, output_type="latent", **kwargs)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps, agent_calls", [(10, 4), (25, 10), (50, 20)])
def test_first_40_percent_use_agents(sd_pipe, name, steps, agent_calls):
    sd_pipe.scheduler = SCHEDULERS[name](sd_pipe.scheduler.config)
    agentsd.apply_patch(sd_pipe)
    calls = record_stages(sd_pipe.unet)
    generate(sd_pipe, steps)
    assert calls == [0] * agent_calls + [1] * (steps - agent_calls)
    calls.clear()
    generate(sd_pipe, steps)  # a second call starts over
    assert calls == [0] * agent_calls + [1] * (steps - agent_calls)


def test_multi_entry_schedulers(sd_pipe):
    # PNDM (the SD 1.5 default, the paper's PLMS) has 51 timesteps for 50 steps; Heun two per step.
    agentsd.apply_patch(sd_pipe)
    calls = record_stages(sd_pipe.unet)
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
    calls = record_stages(pipe.unet)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    generate(pipe, 50, image=image, strength=strength)
    assert calls == expected


def test_sdxl_base_and_refiner_split_one_trajectory(sdxl_pipe):
    """SDXL's ensemble of experts: the base stops at denoising_end, the refiner starts at
    denoising_start; both place their calls on the whole trajectory (placed on its own part, the
    base would switch after 2 of its 5 steps and the refiner use agents first)."""
    agentsd.apply_patch(sdxl_pipe)
    calls = record_stages(sdxl_pipe.unet)
    latents = sdxl_pipe("a cat", num_inference_steps=10, height=32, width=32, denoising_end=0.5, output_type="latent").images
    assert calls == [0] * 4 + [1]
    calls.clear()
    refiner = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)
    refiner("a cat", image=latents, num_inference_steps=10, denoising_start=0.5, output_type="latent")
    assert calls == [1] * 5


def test_pipelines_sharing_a_unet_follow_their_own_schedulers(sd_pipe):
    """One UNet, two pipelines: each call follows the scheduler of the pipeline that makes it, also a
    pipeline built after apply_patch with a scheduler of its own."""
    agentsd.apply_patch(sd_pipe)
    other = type(sd_pipe)(**{**sd_pipe.components, "scheduler": HeunDiscreteScheduler.from_config(sd_pipe.scheduler.config)})
    calls = record_stages(sd_pipe.unet)
    generate(other, 10)
    assert calls == [0] * 8 + [1] * 11
    calls.clear()
    generate(sd_pipe, 10)
    assert calls == [0] * 5 + [1] * 6  # PNDM: 11 entries


def test_nothing_is_set_on_the_pipeline_or_its_scheduler(sd_pipe):
    """So a copy, a pickle, a shared scheduler or a user's own attributes are never affected."""
    generate(sd_pipe, 2)  # what a run sets on them itself
    pipe_attributes, scheduler_attributes = set(sd_pipe.__dict__), set(sd_pipe.scheduler.__dict__)
    agentsd.apply_patch(sd_pipe)
    assert set(sd_pipe.__dict__) == pipe_attributes and set(sd_pipe.scheduler.__dict__) == scheduler_attributes
    generate(sd_pipe, 2)
    assert set(sd_pipe.__dict__) == pipe_attributes and set(sd_pipe.scheduler.__dict__) == scheduler_attributes


def test_bare_unet_in_a_loop_over_scheduler_timesteps(sd_pipe):
    scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    agentsd.apply_patch(sd_pipe.unet)  # no scheduler needed: the timesteps tell their place
    calls = record_stages(sd_pipe.unet)
    scheduler.set_timesteps(5)
    latents, context = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            sd_pipe.unet(scheduler.scale_model_input(latents, t), t, context)
        assert calls == [0, 0, 1, 1, 1]
        calls.clear()
        # timesteps of their own (numbers): looked up in the scheduler given to apply_patch
        agentsd.apply_patch(sd_pipe.unet, scheduler=scheduler)
        calls = record_stages(sd_pipe.unet)
        for t in scheduler.timesteps.tolist():
            sd_pipe.unet(latents, t, context)
        assert calls == [0, 0, 1, 1, 1]
        # and without one, placed by value on the 1000 training timesteps, with a warning
        agentsd.apply_patch(sd_pipe.unet)
        calls = record_stages(sd_pipe.unet)
        with pytest.warns(UserWarning, match="a timestep of its own"):
            for t in (999, 601, 599, 1):
                sd_pipe.unet(latents, torch.tensor(t), context)
        assert calls == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "scheduler",
    # sorted: `compatibles` comes from a set, and pytest-xdist's workers must collect one order
    sorted([*DDIMScheduler.from_config(DDIMScheduler().config).compatibles, LCMScheduler, TCDScheduler], key=lambda c: c.__name__),
    ids=lambda cls: cls.__name__,
)
def test_every_scheduler_hands_out_views_of_its_timesteps(sd_pipe, scheduler):
    """The stage reads each timestep's index from its storage: true of every scheduler of diffusers
    that SD pipelines take (Karras sigmas too)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schedulers = [scheduler.from_config(sd_pipe.scheduler.config)]
            if "use_karras_sigmas" in schedulers[0].config:
                schedulers.append(scheduler.from_config(sd_pipe.scheduler.config, use_karras_sigmas=True))
    except ImportError as error:  # DPMSolverSDEScheduler needs torchsde
        pytest.skip(str(error))
    for instance in schedulers:
        instance.set_timesteps(12)
        timesteps = instance.timesteps
        assert [list_position(t) for t in timesteps] == [(i, len(timesteps)) for i in range(len(timesteps))]


def test_custom_schedule_and_stage_at():
    stages = (Stage(end=0.25, sx=2, sy=2, agent_ratio=0.9, ratio=0.3), Stage(end=1.0, sx=1, sy=1, agent_ratio=0.0, ratio=0.3))
    assert stage_at(stages, 0.0) is stages[0]
    assert stage_at(stages, 0.2499) is stages[0]
    assert stage_at(stages, 0.25) is stages[1]
    assert stage_at(paper_schedule(0.4), 0.39).sx == 4 and stage_at(paper_schedule(0.4), 0.4).sx == 2


def test_list_position_reads_views_only():
    timesteps = torch.arange(10, 0, -1)
    assert [list_position(t) for t in timesteps[3:6]] == [(3, 10), (4, 10), (5, 10)]
    assert list_position(timesteps[4].expand(2)) == (4, 10)  # the same timestep for a batch
    assert list_position(timesteps[4].clone()) is None
    assert list_position(timesteps[2:4]) is None  # two timesteps
    assert list_position(7) is None
    one_step = torch.tensor([999])
    assert list_position(one_step[0]) == list_position(one_step[0].expand(2)) == (0, 1)  # a one-step run's
    assert list_position(torch.tensor(500)) is None and list_position(torch.tensor(500).expand(2)) is None


def test_a_one_step_run_is_placed_without_a_warning(sd_pipe):
    """A one-step run (SD-Turbo's, SDXL-Turbo's) hands the UNet the element of a one-element list: a
    view of a 1-D tensor, the first (and only) step, without a lookup by value, its device read and
    its warning (it was warned about, as if a custom loop's timestep, and its stage placed by value)."""
    agentsd.apply_patch(sd_pipe, min_tokens=0)
    stages = record_stages(sd_pipe.unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd_pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="latent")
        assert stages == [0]
        agentsd.apply_patch(sd_pipe, ratio=0)  # where nothing merges, a loop's own timestep is not looked up
        with torch.no_grad():
            sd_pipe.unet(torch.randn(2, 4, 4, 4), torch.tensor(500), torch.randn(2, 77, 32))


def test_different_timesteps_in_one_call_are_warned_about():
    """ParaDiGMS hands the UNet one timestep per image: one call runs one stage (the first's), said so."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    first, last = scheduler.timesteps[0], scheduler.timesteps[-1]
    with pytest.warns(UserWarning, match="different timesteps in one call"):
        assert trajectory_fraction(torch.stack([first, last]), scheduler) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trajectory_fraction(torch.stack([last, last]), scheduler) == 0.9  # one timestep, for each image
