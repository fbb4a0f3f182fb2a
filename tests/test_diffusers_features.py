"""The patch under diffusers' features: IP-Adapters, processors set later, hooks that wrap forwards,
offloading and casting, threads, copies and pickles, FreeU, PAG, guiders' hooks and modular pipelines.
At ratio 0 nothing may change, bit for bit; at ratio > 0 agentsd must stay on."""

import copy
import io
import pickle
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import (EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPAGPipeline,
                       StableDiffusionXLAutoBlocks)
from diffusers.hooks import (HookRegistry, LayerSkipConfig, PyramidAttentionBroadcastConfig, apply_layer_skip,
                            apply_pyramid_attention_broadcast)
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import (AttnProcessor, AttnProcessor2_0, CustomDiffusionAttnProcessor2_0,
                                                  SlicedAttnProcessor)

import agentsd
from agentsd.attention import AgentSDAttnProcessor
from agentsd.models import tiny_pipeline, unet_from_config
from conftest import generate, unet_inputs
from ip_adapters import image_embeds, load_ip_adapter

PATCH = dict(ratio=0.5, seed=0)  # the paper's schedule: both stages run in 4 steps
GUIDED_BLOCKS = "down_blocks.0.attentions.0.transformer_blocks"  # on the merged level


def merged_attn1(unet):
    return [patched.block.attn1 for patched in unet._agentsd.blocks if patched.merges_attn1]


def assert_agentsd_on(unet):
    """Every merged block's attn1 runs agentsd's processor, and a call merges tokens in it."""
    attns = merged_attn1(unet)
    assert attns and all(isinstance(a.processor, AgentSDAttnProcessor) for a in attns)


# ---------------------------------------------------------------- IP-Adapter


@pytest.mark.parametrize("kind", ["plain", "plus", "faceid"])
def test_ip_adapter_loads_and_unloads_in_any_order(kind):
    pipe = tiny_pipeline("sd15")
    embeds = dict(ip_adapter_image_embeds=[image_embeds(kind)])
    plain = generate(pipe)
    load_ip_adapter(pipe, kind)
    with_adapter = generate(pipe, **embeds)
    agentsd.apply_patch(pipe, ratio=0.0)  # patched over a loaded adapter
    np.testing.assert_array_equal(generate(pipe, **embeds), with_adapter)
    agentsd.apply_patch(pipe, **PATCH)
    loaded_first = generate(pipe, **embeds)
    assert np.abs(loaded_first - with_adapter).max() > 1e-3

    pipe.unload_ip_adapter()  # unloaded while patched
    assert_agentsd_on(pipe.unet)
    patched = generate(pipe)
    load_ip_adapter(pipe, kind)  # loaded while patched: the same images as loaded first
    assert_agentsd_on(pipe.unet)
    np.testing.assert_array_equal(generate(pipe, **embeds), loaded_first)
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe, **embeds), with_adapter)
    pipe.unload_ip_adapter()
    np.testing.assert_array_equal(generate(pipe), plain)
    agentsd.apply_patch(pipe, **PATCH)
    np.testing.assert_array_equal(generate(pipe), patched)


def test_ip_adapter_masks():
    pipe = tiny_pipeline("sd15")
    load_ip_adapter(pipe, "plain")
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    call = dict(ip_adapter_image_embeds=[image_embeds("plain")],
                cross_attention_kwargs={"ip_adapter_masks": IPAdapterMaskProcessor().preprocess(mask, height=32, width=32)})  # fmt: skip
    masked = generate(pipe, **call)
    assert np.abs(masked - generate(pipe, ip_adapter_image_embeds=call["ip_adapter_image_embeds"])).max() > 1e-3
    agentsd.apply_patch(pipe, ratio=0.0)
    np.testing.assert_array_equal(generate(pipe, **call), masked)
    agentsd.apply_patch(pipe, **PATCH)
    assert np.abs(generate(pipe, **call) - masked).max() > 1e-3


# ---------------------------------------------------------------- processors set after the patch


def test_set_default_attn_processor_goes_beneath_agentsd():
    pipe = tiny_pipeline("sd15")
    reference = tiny_pipeline("sd15")
    reference.unet.set_default_attn_processor()
    default = generate(reference)
    agentsd.apply_patch(pipe, ratio=0.0)
    pipe.unet.set_default_attn_processor()  # diffusers sees its own processors and accepts the call
    np.testing.assert_array_equal(generate(pipe), default)
    patched = generate(agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH))
    agentsd.apply_patch(pipe, **PATCH)
    assert_agentsd_on(pipe.unet)
    assert all(type(a.processor.processor) is AttnProcessor for a in merged_attn1(pipe.unet))
    np.testing.assert_allclose(generate(pipe), patched, atol=1e-5)  # the same algorithm, other attention kernels
    agentsd.remove_patch(pipe)
    assert all(type(p) is AttnProcessor for p in pipe.unet.attn_processors.values())
    np.testing.assert_array_equal(generate(pipe), default)


def test_attention_slicing_goes_beneath_agentsd():
    pipe = tiny_pipeline("sd15")
    reference = tiny_pipeline("sd15")
    reference.enable_attention_slicing(1)
    sliced = generate(reference)
    agentsd.apply_patch(pipe, ratio=0.0)
    pipe.enable_attention_slicing(1)
    np.testing.assert_array_equal(generate(pipe), sliced)
    agentsd.apply_patch(pipe, **PATCH)
    assert_agentsd_on(pipe.unet)
    assert all(type(a.processor.processor) is SlicedAttnProcessor for a in merged_attn1(pipe.unet))
    patched_sliced = generate(pipe)
    assert np.abs(patched_sliced - sliced).max() > 1e-3  # agentsd is on
    pipe.disable_attention_slicing()
    np.testing.assert_allclose(generate(pipe), patched_sliced, atol=1e-5)


def test_fused_projections_go_beneath_agentsd():
    reference = tiny_pipeline("sd15")
    reference.fuse_qkv_projections()
    fused = generate(reference)
    pipe = agentsd.apply_patch(tiny_pipeline("sd15"), ratio=0.0)
    pipe.fuse_qkv_projections()
    np.testing.assert_array_equal(generate(pipe), fused)
    patched = generate(agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH))
    agentsd.apply_patch(pipe, **PATCH)
    assert_agentsd_on(pipe.unet)
    np.testing.assert_allclose(generate(pipe), patched, atol=1e-5)  # agents on the same weights, fused or not
    pipe.unfuse_qkv_projections()
    assert_agentsd_on(pipe.unet)
    np.testing.assert_allclose(generate(pipe), patched, atol=1e-5)


def test_a_processor_assigned_directly_warns_once():
    pipe = agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH)
    attn = merged_attn1(pipe.unet)[0]
    attn.processor = AttnProcessor2_0()  # not through set_processor: agentsd cannot see it
    with pytest.warns(UserWarning, match="assigned to attn1 directly") as warned:
        generate(pipe, steps=2)
    assert sum("directly" in str(w.message) for w in warned) == 1


def test_a_processor_with_weights_is_set_as_it_is():
    class Weighted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(()))

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return AttnProcessor2_0()(attn, hidden_states, *args, **kwargs) * self.gain

    pipe = agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH)
    attn = merged_attn1(pipe.unet)[0]
    with pytest.warns(UserWarning, match="has weights of its own"):
        attn.set_processor(Weighted())
    assert type(attn.processor) is Weighted and "processor.gain" in dict(attn.named_parameters())
    generate(pipe, steps=2)


def custom_diffusion_processors(unet) -> dict:
    """Custom Diffusion's processors computing what diffusers' own do: weightless modules on attn1, on
    attn2 modules with copies of its projections (as diffusers' Custom Diffusion test makes them)."""
    processors = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn1.processor"):
            processors[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        processor = CustomDiffusionAttnProcessor2_0(hidden_size=attn.to_q.out_features, cross_attention_dim=attn.to_k.in_features)
        for mine, its in [("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])]:
            layer = getattr(processor, f"{mine}_custom_diffusion")
            (layer[0] if mine == "to_out" else layer).load_state_dict(its.state_dict())
        processors[name] = processor
    return processors


def test_custom_diffusion_processors_merge_as_diffusers_own():
    """Custom Diffusion's weightless attn1 processors go beneath agentsd, silently; its attn2 processors
    read no token positions, so merge_crossattn merges there (ToMe: agent attention replaces only
    diffusers' own softmax processors)."""
    pipe = agentsd.apply_patch(tiny_pipeline("sd15"), ratio=0.5, sx=2, sy=2, agent_ratio=0.0, merge_crossattn=True)
    default = generate(pipe, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.unet.set_attn_processor(custom_diffusion_processors(pipe.unet))
        custom = generate(pipe, steps=2)
    for attn in merged_attn1(pipe.unet):
        assert type(attn.processor) is AgentSDAttnProcessor and type(attn.get_processor()) is CustomDiffusionAttnProcessor2_0
    np.testing.assert_allclose(custom, default, atol=1e-5)  # the same attention, merged alike


# ---------------------------------------------------------------- merging where token positions matter
# merge_crossattn / merge_mlp hand attn2 / ff the merged tokens; where a call reads them by position (IP-Adapter
# masks, processors that keep attention maps) or in chunks, those modules run unmerged instead.


def test_merge_crossattn_leaves_ip_adapter_masks_their_tokens():
    """diffusers lays the masks over attn2's queries as a raster grid: an all-ones mask changes nothing."""
    pipe = tiny_pipeline("sd15")
    load_ip_adapter(pipe, "plain")
    embeds = dict(ip_adapter_image_embeds=[image_embeds("plain")])
    ones = IPAdapterMaskProcessor().preprocess(torch.ones(1, 1, 32, 32), height=32, width=32)
    agentsd.apply_patch(pipe, **PATCH, merge_crossattn=True)
    masked = generate(pipe, **embeds, cross_attention_kwargs={"ip_adapter_masks": ones})
    np.testing.assert_array_equal(masked, generate(agentsd.apply_patch(pipe, **PATCH), **embeds, cross_attention_kwargs={"ip_adapter_masks": ones}))
    assert np.abs(generate(agentsd.apply_patch(pipe, **PATCH, merge_crossattn=True), **embeds) - masked).max() > 1e-3


def test_merge_crossattn_leaves_processors_that_keep_attention_maps():
    """Attend-and-Excite keeps the cross-attention maps of one resolution (the merged level here): attn2 runs
    unmerged under its processor, with a warning, as with merge_crossattn off."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    pipe = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in tiny_pipeline("sd15").components.items() if k != "image_encoder"})
    call = dict(prompt="a cat and a frog", token_indices=[2, 5], height=128, width=128, num_inference_steps=3,
                max_iter_to_alter=2, attn_res=(16, 16), output_type="np")  # fmt: skip
    unpatched = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    agentsd.apply_patch(pipe, **PATCH)
    without = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(without - unpatched).max() > 1e-3  # the level merges
    agentsd.apply_patch(pipe, **PATCH, merge_crossattn=True)
    with pytest.warns(UserWarning, match="AttendExciteAttnProcessor on attn2"):
        np.testing.assert_array_equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, without)


@pytest.mark.parametrize("dim", [0, 1])
def test_merge_mlp_leaves_a_chunked_feed_forward(dim):
    """set_chunk_feed_forward: diffusers calls ff once per chunk of the batch (dim 0) or of the tokens
    (dim 1; chunks of the merged length here), which the block's plan does not fit."""
    pipe = tiny_pipeline("sd15")
    agentsd.apply_patch(pipe, **PATCH)
    blocks = [patched.block for patched in pipe.unet._agentsd.blocks if patched.users]  # the merged level's
    for block in blocks:
        block.set_chunk_feed_forward(1 if dim == 0 else 8, dim=dim)  # 16 tokens at 32px, 8 merged away
    chunked = generate(pipe)
    agentsd.apply_patch(pipe, **PATCH, merge_mlp=True)
    np.testing.assert_array_equal(generate(pipe), chunked)
    for block in blocks:
        block.set_chunk_feed_forward(None)
    assert np.abs(generate(pipe) - chunked).max() > 1e-3  # unchunked, the feed-forward merges


# ---------------------------------------------------------------- hooks that wrap forwards


class CountCalls(ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def hooked_modules(unet):
    """A merged block and the modules lean_forward calls the insides of."""
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    return [block, block.attn1, block.attn2, block.ff]


@pytest.mark.parametrize("when", ["before", "after"])
def test_accelerate_hooks_run_on_every_call_and_survive_remove(when):
    pipe = tiny_pipeline("sd15")
    plain = generate(pipe)
    patched = generate(agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH))
    if when == "after":
        agentsd.apply_patch(pipe, **PATCH)
    hooks = [CountCalls() for _ in range(4)]
    modules = hooked_modules(pipe.unet)
    for module, hook in zip(modules, hooks):
        add_hook_to_module(module, hook)
    if when == "before":
        agentsd.apply_patch(pipe, **PATCH)
    unet_calls = []
    pipe.unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    np.testing.assert_array_equal(generate(pipe), patched)
    assert [h.calls for h in hooks] == [len(unet_calls)] * 4
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe), plain)
    assert [h.calls for h in hooks] == [len(unet_calls)] * 4  # still there after remove_patch
    for module in modules:
        remove_hook_from_module(module)
    np.testing.assert_array_equal(generate(pipe), plain)


@pytest.mark.parametrize("offload", ["accelerate", "group-leaf", "group-block", "layerwise-casting"])
def test_offloading_and_casting(offload):
    """accelerate's sequential offload (its cpu_offload, which enable_sequential_cpu_offload applies to each
    model; that method itself fails on the CPU with accelerate 1.16, patched or not), diffusers' group
    offloading and layerwise casting: ratio 0 is the unpatched result, agentsd stays on over them."""

    def prepared(patch=None):
        pipe = tiny_pipeline("sd15")
        if patch == "before":
            agentsd.apply_patch(pipe, **PATCH)
        if offload == "accelerate":
            cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
        elif offload.startswith("group"):
            pipe.unet.enable_group_offload(torch.device("cpu"), offload_type=offload.removeprefix("group-") + "_level",
                                           num_blocks_per_group=1)  # fmt: skip
        else:
            pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        return pipe

    reference = generate(prepared())
    pipe = prepared()
    agentsd.apply_patch(pipe, ratio=0.0)
    np.testing.assert_array_equal(generate(pipe), reference)
    agentsd.apply_patch(pipe, **PATCH)
    after = generate(pipe)
    assert np.abs(after - reference).max() > 1e-3
    np.testing.assert_allclose(generate(prepared("before")), after, atol=1e-5)
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe), reference)


def test_pyramid_attention_broadcast():
    """diffusers' Pyramid Attention Broadcast hooks every attn1 and returns an earlier call's output in
    the calls it skips. agentsd's attn1 gives its output at every token position, unmerged, so that
    output can stand in at a call with another merge pattern or stage: ratio 0 is bit for bit PAB
    alone, merging runs through skipped calls and across the stage change, remove restores."""
    computed = []  # the first merged block's attn1 computing (PAB runs its forward), not skipped
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=3, spatial_attention_timestep_skip_range=(-1, 1000),
        current_timestep_callback=lambda: 500)  # fmt: skip

    def images(pipe):
        HookRegistry.check_if_exists_or_initialize(pipe.unet).reset_stateful_hooks(recurse=True)  # PAB's cache
        computed.clear()
        return generate(pipe, steps=6)

    pipe = tiny_pipeline("sd15")
    plain = images(pipe)
    agentsd.apply_patch(pipe, ratio=0.0)
    apply_pyramid_attention_broadcast(pipe.unet, config)  # onto the patched UNet
    pipe.unet.get_submodule(GUIDED_BLOCKS)[0].attn1.to_out[0].register_forward_hook(lambda *_: computed.append(1))
    hooked = images(pipe)
    assert len(computed) == 3 and not np.array_equal(hooked, plain)  # calls 0, 3, 6 of 7 (PNDM's 6 steps)
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(images(pipe), hooked)
    agentsd.apply_patch(pipe, **PATCH)  # stages change between calls 2 and 3: a cached agent-stage output at 1, 2
    merged = images(pipe)
    assert len(computed) == 3 and np.isfinite(merged).all() and not np.array_equal(merged, hooked)
    assert_agentsd_on(pipe.unet)
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(images(pipe), hooked)


# ---------------------------------------------------------------- threads, copies, pickles, schedulers


def test_threads_sharing_one_unet_get_the_images_of_sequential_calls():
    """Pipelines built from one set of components, at other stages and sizes, run at once in threads.
    Each has a scheduler and a tokenizer of its own, as unpatched diffusers needs: the scheduler keeps
    the loop's state, and transformers' fast tokenizer sets its padding on itself at every call
    (transformers issue 47085; shared, unpatched pipelines here gave other images in 2 rounds of 12)."""
    txt2img = agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH)

    def own_components():
        return {**txt2img.components, "scheduler": copy.deepcopy(txt2img.scheduler), "tokenizer": copy.deepcopy(txt2img.tokenizer)}

    img2img = StableDiffusionImg2ImgPipeline(**own_components())
    other_size = type(txt2img)(**own_components())
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runs = {
        "txt2img": lambda: generate(txt2img, steps=8),
        "img2img": lambda: generate(img2img, steps=8, image=image, strength=0.9),
        "txt2img-64": lambda: other_size("a dog", num_inference_steps=8, height=64, width=48, output_type="np",
                                      generator=torch.Generator().manual_seed(2)).images,  # fmt: skip
    }
    sequential = {name: run() for name, run in runs.items()}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for _ in range(2):
            results, barrier = {}, threading.Barrier(len(runs))

            def worker(name):
                barrier.wait()
                results[name] = runs[name]()

            threads = [threading.Thread(target=worker, args=(name,)) for name in runs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for name in runs:
                np.testing.assert_array_equal(results[name], sequential[name], err_msg=name)
    finally:
        sys.setswitchinterval(interval)


def test_deep_copy_is_an_independent_patched_pipeline():
    pipe = agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH)
    patched = generate(pipe)
    plain = generate(tiny_pipeline("sd15"))
    twin = copy.deepcopy(pipe)
    assert agentsd.is_patched(twin) and twin.unet._agentsd is not pipe.unet._agentsd
    np.testing.assert_array_equal(generate(twin), patched)
    agentsd.remove_patch(twin)
    np.testing.assert_array_equal(generate(twin), plain)
    np.testing.assert_array_equal(generate(pipe), patched)  # the original keeps its patch
    twin = copy.deepcopy(pipe)
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(twin), patched)  # and the copy keeps its own


def test_pickled_unet_is_patched_the_same_way():
    pipe = agentsd.apply_patch(tiny_pipeline("sd15"), **PATCH)
    patched = generate(pipe)
    buffer = io.BytesIO()
    torch.save(pipe.unet, buffer)
    buffer.seek(0)
    for unet in (pickle.loads(pickle.dumps(pipe.unet)), torch.load(buffer, weights_only=False)):
        other = tiny_pipeline("sd15")
        other.unet = unet
        assert agentsd.is_patched(other)
        np.testing.assert_array_equal(generate(other), patched)
        agentsd.remove_patch(other)
        np.testing.assert_array_equal(generate(other), generate(tiny_pipeline("sd15")))


def test_a_scheduler_shared_by_two_patched_pipelines():
    """Removing one pipeline's patch leaves the other's stages alone; the user's own attributes on the
    pipeline and the scheduler stay."""
    first = tiny_pipeline("sd15")
    second = type(first)(**{**first.components, "unet": copy.deepcopy(first.unet)})
    own_step = first.scheduler.scale_model_input
    first.scheduler.scale_model_input = own_step  # set on the instance by the user
    agentsd.apply_patch(first, **PATCH)
    agentsd.apply_patch(second, **PATCH)
    expected = generate(second)
    agentsd.remove_patch(first)
    np.testing.assert_array_equal(generate(second), expected)
    assert first.scheduler.__dict__["scale_model_input"] is own_step


# ---------------------------------------------------------------- guidance and pipeline switches


def freeu_pipeline():
    pipe = tiny_pipeline("sd15")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    return pipe


def pag_pipeline(layers):
    """Perturbed-attention guidance on `layers`: its processors are assigned to those attn1s directly
    for each call, then set back through set_attn_processor."""
    return lambda: StableDiffusionPAGPipeline(**tiny_pipeline("sd15").components, pag_applied_layers=layers)


@pytest.mark.parametrize(
    "make, kwargs, agentsd_off_in_pag_layers",
    [(freeu_pipeline, {}, False), (pag_pipeline(["mid"]), {"pag_scale": 3.0}, False),
     (pag_pipeline(["down"]), {"pag_scale": 3.0}, True)],
    ids=["freeu", "pag-mid", "pag-down"],
)  # fmt: skip
def test_freeu_and_pag(make, kwargs, agentsd_off_in_pag_layers):
    """Bit for bit at ratio 0 and after remove_patch; agentsd on after each call. PAG's processors on a
    merged level (its down layers) take agentsd off there for the call, with a warning; on the mid block
    (PAG's usual layer) nothing is merged anyway."""
    pipe = make()
    plain = generate(pipe, **kwargs)
    for ratio in (0.0, PATCH["ratio"]):
        agentsd.apply_patch(pipe, ratio, seed=0)
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            patched = generate(pipe, **kwargs)
        assert any("as diffusers' PAG does" in str(w.message) for w in warned) == agentsd_off_in_pag_layers
        assert np.array_equal(patched, plain) == (ratio == 0)  # bit for bit at 0, merged above
    assert np.isfinite(patched).all()
    assert_agentsd_on(pipe.unet)
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe, **kwargs), plain)


def skip_layer(**skip):
    """A hook of diffusers' skip-layer and perturbed-attention guiders on the first guided block."""
    return lambda unet: apply_layer_skip(unet, LayerSkipConfig(indices=[0], fqn=GUIDED_BLOCKS, **skip))


def smoothed_energy(unet):
    """Smoothed-energy guidance's hook: it blurs attn1's queries, read as an image."""
    query = unet.get_submodule(GUIDED_BLOCKS)[0].attn1.to_q
    hook = SmoothedEnergyGuidanceHook(blur_sigma=2.0)
    HookRegistry.check_if_exists_or_initialize(query).register_hook(hook, "layer_skip_hook")  # removed as guided() does


def remove_guider_hooks(unet):
    HookRegistry.check_if_exists_or_initialize(unet).remove_hook("layer_skip_hook", recurse=True)


def guided(pipe, add_hook, **kwargs):
    """Images made with the hook on, added and removed around the call, as the guiders do in each step."""
    add_hook(pipe.unet)
    try:
        return generate(pipe, **kwargs)
    finally:
        remove_guider_hooks(pipe.unet)


@pytest.mark.parametrize(
    "add_hook, settings, warns",
    [(skip_layer(skip_attention=True, skip_ff=False), {}, True),
     (skip_layer(skip_attention=False, skip_attention_scores=True), {}, True),  # PAG's setting
     (skip_layer(skip_attention=True, skip_ff=True), {}, False),  # the whole block skipped, agentsd's forward too
     (skip_layer(skip_attention=False, skip_ff=True), {"merge_mlp": True}, True),
     (smoothed_energy, {}, True)],
    ids=["skip-attention", "skip-attention-scores", "skip-block", "skip-ff", "smoothed-energy"],
)  # fmt: skip
def test_guider_hooks_see_the_block_unmerged(add_hook, settings, warns):
    """The hooks that diffusers' guiders put on the blocks they perturb: at ratio 0 bit for bit;
    merging, the guided block computes what it does unpatched (its output from its input, recomputed
    outside a UNet call, where nothing merges), with a warning, and the other blocks merge. The
    skip-attention hook crashed (AgentSDAttnProcessor was not in diffusers' registry of processors),
    the others saw merged tokens."""
    pipe = tiny_pipeline("sd15")
    plain = generate(pipe)
    hooked = guided(pipe, add_hook)
    assert not np.array_equal(hooked, plain)  # the hook acts
    agentsd.apply_patch(pipe, 0.0)
    np.testing.assert_array_equal(guided(pipe, add_hook), hooked)

    agentsd.apply_patch(pipe, **PATCH, **settings)
    block = pipe.unet.get_submodule(GUIDED_BLOCKS)[0]
    calls = []
    record = lambda module, args, kwargs, out: calls.append((args, kwargs, out))  # noqa: E731
    handle = block.register_forward_hook(record, with_kwargs=True)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        add_hook(pipe.unet)
        merged = generate(pipe)
        handle.remove()
        for args, kwargs, out in calls:
            torch.testing.assert_close(block(*args, **kwargs), out, rtol=0, atol=0)
        remove_guider_hooks(pipe.unet)
    assert any("guider's hook" in str(w.message) for w in warned) == warns
    assert calls and not np.array_equal(merged, hooked) and np.isfinite(merged).all()  # the other blocks merge
    agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe), plain)


def test_modular_pipeline():
    """diffusers' modular SDXL pipeline (its guider calls the UNet once per condition): apply_patch takes
    it as it takes the classic pipeline; its stages follow the scheduler."""
    classic = tiny_pipeline("sdxl")
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{name: c for name, c in classic.components.items() if c is not None})

    def latents():
        return pipe(prompt="a cat", num_inference_steps=5, height=32, width=32, output="latents",
                    generator=torch.Generator().manual_seed(0))  # fmt: skip

    plain = latents()
    agentsd.apply_patch(pipe, 0.0)
    assert torch.equal(latents(), plain)
    agentsd.apply_patch(pipe, **PATCH)
    stages = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: stages.append(pipe.unet._agentsd.call.stage_index))
    merged = latents()
    handle.remove()
    assert stages == [0] * 4 + [1] * 6  # 2 of 5 steps with agents, two calls per step
    assert not torch.equal(merged, plain) and torch.isfinite(merged).all()
    agentsd.remove_patch(pipe)
    assert torch.equal(latents(), plain)


def test_ratio_zero_sdxl_with_euler_is_bit_identical():
    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    plain = generate(pipe)
    agentsd.apply_patch(pipe, ratio=0.0)
    np.testing.assert_array_equal(generate(pipe), plain)


# ---------------------------------------------------------------- training


def test_training_merges_and_gradient_checkpointing_runs_unmerged():
    """Gradients flow through the merges; under gradient checkpointing the backward pass runs the blocks
    again after the UNet call, so agentsd stands aside (a warning) and gradients are the plain UNet's."""
    sample, timestep, context, _ = unet_inputs("sd15")

    def gradients(patch, checkpointing):
        unet = unet_from_config("sd15", tiny=True).train()
        if patch:
            agentsd.apply_patch(unet, ratio=0.5, sx=2, sy=2, agent_ratio=0.5)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet(sample, timestep, context).sample.square().mean().backward()
        return torch.cat([p.grad.flatten() for p in unet.parameters()])

    plain = gradients(False, False)
    assert not torch.allclose(gradients(True, False), plain, atol=1e-4)  # merged, and every weight has a gradient
    with pytest.warns(UserWarning, match="gradient checkpointing is on"):
        checkpointed = gradients(True, True)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)
