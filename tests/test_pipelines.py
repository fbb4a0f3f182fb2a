"""End to end: tiny diffusers pipelines of each supported kind generate images with the patch on."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    T2IAdapter,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import agentsd
from agentsd.models import tiny_pipeline

SIZE = 64


def _image(seed=0):
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(name):
    """(pipeline, extra call arguments) for each supported kind of pipeline."""
    base = tiny_pipeline("sdxl" if name.startswith("sdxl") else "sd15")
    if name in ("sd", "sdxl"):
        return base, {}
    if name == "img2img":
        return StableDiffusionImg2ImgPipeline(**base.components), {"image": _image(), "strength": 0.5}
    if name == "sdxl-img2img":
        return StableDiffusionXLImg2ImgPipeline(**base.components), {"image": _image(), "strength": 0.5}
    if name == "inpaint":
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., SIZE // 4 :, :] = 1
        return StableDiffusionInpaintPipeline(**base.components), {"image": _image(), "mask_image": mask}
    if name == "t2i-adapter":  # its features add to the down blocks' outputs, one per level
        channels = list(base.unet.config.block_out_channels)
        adapter = T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1, downscale_factor=8, adapter_type="full_adapter")
        components = {k: v for k, v in base.components.items() if k != "image_encoder"}
        return StableDiffusionAdapterPipeline(**components, adapter=adapter), {"image": _image(1)}
    if name == "sdxl-controlnet-union":  # ControlNet++: one ControlNet, a control mode per image
        known = inspect.signature(ControlNetUnionModel.__init__).parameters
        config = {k: v for k, v in base.unet.config.items() if k in known}
        controlnet = ControlNetUnionModel(**config, num_trans_channel=16, num_trans_head=1, num_proj_channel=16,
                                          conditioning_embedding_out_channels=(4, 8, 8, 16))  # fmt: skip
        pipe = StableDiffusionXLControlNetUnionPipeline(**base.components, controlnet=controlnet)
        return pipe, {"control_image": [_image(1)], "control_mode": [1]}
    controlnet = ControlNetModel.from_unet(base.unet)
    cls = StableDiffusionXLControlNetPipeline if name.startswith("sdxl") else StableDiffusionControlNetPipeline
    return cls(**base.components, controlnet=controlnet), {"image": _image(1)}


def generate(pipe, extra, steps=5):
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=steps, height=SIZE, width=SIZE, generator=generator,
                output_type="np", **extra).images  # fmt: skip


@pytest.mark.parametrize("name", ["sd", "img2img", "inpaint", "controlnet", "t2i-adapter", "sdxl", "sdxl-img2img", "sdxl-controlnet",
                                  "sdxl-controlnet-union"])
def test_pipeline_generates_with_patch(name):
    pipe, extra = build(name)
    baseline = generate(pipe, extra)
    agentsd.apply_patch(pipe, ratio=0.0)
    np.testing.assert_array_equal(generate(pipe, extra), baseline)  # bit for bit
    agentsd.apply_patch(pipe, ratio=0.5)
    stages = []
    spy = pipe.unet.register_forward_pre_hook(lambda *_: stages.append(pipe.unet._agentsd.config.stages[pipe.unet._agentsd.call.stage_index].sx))
    patched = generate(pipe, extra)
    spy.remove()
    assert patched.shape == baseline.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(patched).all()
    assert np.abs(patched - baseline).max() > 1e-3
    assert set(stages) == ({2} if "img2img" in name else {4, 2})  # img2img at strength 0.5 starts past 0.4
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe, extra), baseline)


def test_lora_weights_stay_active(tmp_path):
    pipe = tiny_pipeline("sd15")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # fmt: skip
    pipe.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    pipe = tiny_pipeline("sd15")
    plain = generate(pipe, {})
    agentsd.apply_patch(pipe, ratio=0.5, seed=0)
    patched = generate(pipe, {})
    pipe.load_lora_weights(tmp_path)  # loaded into a patched pipeline
    patched_lora = generate(pipe, {})
    assert np.abs(patched_lora - patched).max() > 1e-3  # the LoRA acts inside the agent attention
    # its scale, passed as diffusers does, reaches the patched blocks: 0 is no LoRA
    np.testing.assert_allclose(generate(pipe, {"cross_attention_kwargs": {"scale": 0.0}}), patched, atol=1e-6)
    agentsd.remove_patch(pipe)
    lora = generate(pipe, {})
    assert np.abs(lora - plain).max() > 1e-3
    agentsd.apply_patch(pipe, ratio=0.5, seed=0)  # patched after loading
    np.testing.assert_allclose(generate(pipe, {}), patched_lora, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    pipe = tiny_pipeline("sd15").to(dtype=dtype)
    for precision in (None, "fp32"):
        agentsd.apply_patch(pipe, ratio=0.5, attn_precision=precision)
        image = generate(pipe, {}, steps=3)
        assert np.isfinite(image).all() and image.std() > 0
