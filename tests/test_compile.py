"""torch.compile of a patched UNet: the eager result, no graph break, a graph per stage or one for all."""

import copy
import re

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers import StableDiffusionPAGPipeline
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import agentsd
from agentsd import kernels
from agentsd.models import tiny_pipeline, unet_from_config
from conftest import generate, run_unet, unet_inputs
from ip_adapters import image_embeds, load_ip_adapter


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_graph(monkeypatch):
    """Both stages in one graph (agentsd.schedule.ONE_GRAPH_FOR_STAGES, not the default)."""
    monkeypatch.setattr(agentsd.schedule, "ONE_GRAPH_FOR_STAGES", True)


@pytest.mark.parametrize("kind, backend", [("sd15", "inductor"), ("sdxl", "aot_eager")])
def test_compiled_equals_eager_in_both_stages_from_one_graph(one_graph, kind, backend):
    """The paper's schedule compiled with fullgraph: in each stage the eager result, and one graph for
    both (the stage is data there: a torch.cond; inductor once laid out a branch's input otherwise
    than the branch was traced with). Inductor's caches keep that graph (torch 2.11-2.14 left graphs
    with a cond out of them, and every process compiled it again): compiled anew, it comes from them."""
    unet = unet_from_config(kind, tiny=True).eval()
    agentsd.apply_patch(unet, 0.5, seed=0)
    sample, _, context, kwargs = unet_inputs(kind, latent=(12, 12))
    timesteps = torch.tensor([981, 661, 341, 21], device=sample.device)  # a list: the stage is a call's place in it
    stages = []
    spy = torch.compiler.disable(lambda *_: stages.append(unet._agentsd.call.stage_index))  # no guard on len(stages)
    unet.register_forward_pre_hook(spy)
    eager = [run_unet(unet, (sample, t, context, kwargs)) for t in timesteps]

    def compiled_runs_give_eager():
        compiled = torch.compile(unet, backend=backend, fullgraph=True)  # fullgraph raises on any graph break
        for t, expected in zip(timesteps, eager):
            torch.testing.assert_close(run_unet(compiled, (sample, t, context, kwargs)), expected, rtol=1e-4, atol=1e-4)

    # the compiled UNet's own first call marks cond cacheable, not the eager calls above
    with torch._inductor.config.patch(unsafe_marked_cacheable_functions={}):
        compiled_runs_give_eager()
        assert stages == [0, 0, 1, 1] * 2
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
        if backend == "inductor":
            assert counters["inductor"]["fxgraph_cache_bypass"] == counters["aot_autograd"]["autograd_cache_bypass"] == 0
            torch._dynamo.reset()
            counters.clear()
            compiled_runs_give_eager()
            assert counters["aot_autograd"]["autograd_cache_hit"] == 1


@pytest.mark.parametrize("path", ["lean forward", "attention processor"])
def test_compiled_schedule_frees_what_its_cond_reads(one_graph, path):
    """Inductor (torch 2.11-2.13) writes the frees of a torch.cond's operands into the branch it
    generates first only: an operand that dies at the cond stays allocated to the end of the compiled
    UNet whenever the other stage runs (+0.175 GiB at SD 1.5 1024). Each operand is freed after it,
    and the result is the eager one."""
    unet = unet_from_config("sd15", tiny=True).eval()
    if path == "attention processor":
        unet.set_attn_processor(AttnProcessor())  # on attn2, it sends the blocks through diffusers' forward
    agentsd.apply_patch(unet, 0.5, seed=0)
    inputs = unet_inputs("sd15", latent=(12, 12))
    compiled, (code,) = run_and_get_code(run_unet, torch.compile(unet, fullgraph=True), inputs)
    torch.testing.assert_close(compiled, run_unet(unet, inputs), rtol=1e-4, atol=1e-4)  # its branches compute attn1's input
    lines = code[code.index("def call("):].splitlines()
    branches = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*false_graph_\d+_args = \[.*\]", line)]
    assert branches  # the stages compiled as conds
    for i in branches:
        for operand in re.findall(r"\bbuf\d+", lines[i].partition("=")[2]):  # not inputs (argN_1): the caller's
            assert any(re.search(rf"\bdel {operand}\b", line) for line in lines[i + 1 :]), (operand, lines[i])


def _chunk_feed_forward(pipe):
    for block in (m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)):
        block.set_chunk_feed_forward(1, dim=1)  # chunks of 1: any merged length divides


# Each sends blocks to diffusers' forward beneath the patch, which torch 2.13's dynamo could not trace
# when called as type(block).forward(block, ...): (what it does to the pipeline, or the pipeline it
# builds from it; what the call adds).
FEATURES = {
    "ip-adapter": (load_ip_adapter, dict(ip_adapter_image_embeds=[image_embeds("plain")])),
    "chunked feed-forward": (_chunk_feed_forward, {}),
    "attention slicing": (lambda pipe: pipe.enable_attention_slicing(1), {}),
    "fused qkv": (lambda pipe: pipe.fuse_qkv_projections(), {}),
    "default processor": (lambda pipe: pipe.unet.set_default_attn_processor(), {}),
    "pag": (lambda pipe: StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["down"]), dict(pag_scale=2.0)),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_diffusers_features_compile_to_the_eager_images(feature):
    """Merging, compiled with fullgraph (no graph break), the images of the eager pipeline."""
    change, kwargs = FEATURES[feature]
    pipe = tiny_pipeline("sd15")
    built = change(pipe)
    pipe = agentsd.apply_patch(pipe if built is None else built, 0.5, seed=0)
    eager = generate(pipe, size=64, **kwargs)
    pipe.unet = torch.compile(pipe.unet, backend="eager", fullgraph=True)
    np.testing.assert_allclose(generate(pipe, size=64, **kwargs), eager, atol=1e-6)
    assert not counters["graph_break"]


# (apply_patch settings, ONE_GRAPH_FOR_STAGES or None for the default, graphs): with one graph, a block merging
# only for attn1 takes every stage at once; where attn2 merges too it needs the stage's plan in two places: a
# graph per stage.
GRAPHS_OVER_WHOLE_RUNS = {
    "merging": (dict(min_tokens=0), None, 2),
    "merging, one graph": (dict(min_tokens=0), True, 1),
    "nothing-merged": (dict(min_tokens=10**9), False, 1),
    "merging-cross-attention, one graph": (dict(min_tokens=0, merge_crossattn=True), True, 2),
}


@pytest.mark.parametrize("case", GRAPHS_OVER_WHOLE_RUNS)
def test_graphs_over_whole_runs(monkeypatch, sd_pipe, case):
    """Over runs that pass both stages: a graph per stage (the default; the UNet's pre-hook runs
    eagerly: it reads where the timestep lies), or with ONE_GRAPH_FOR_STAGES one graph, as unpatched,
    where both stages can share it; one also where no block reaches min_tokens (by default SD 1.5 at
    512px, SDXL at 1024px). Each gives the eager images."""
    settings, one_graph, graphs = GRAPHS_OVER_WHOLE_RUNS[case]
    if one_graph is not None:
        monkeypatch.setattr(agentsd.schedule, "ONE_GRAPH_FOR_STAGES", one_graph)
    agentsd.apply_patch(sd_pipe, **settings)
    eager = generate(sd_pipe, steps=10)
    sd_pipe.unet = torch.compile(sd_pipe.unet, backend="eager", fullgraph=True)
    for _ in range(2):
        np.testing.assert_allclose(generate(sd_pipe, steps=10), eager, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("stage", [dict(sx=4, sy=4, agent_ratio=0.95), dict(sx=2, sy=2, agent_ratio=0.5)], ids=["agent", "tome"])
def test_kernels_compile_as_custom_ops(monkeypatch, stage):
    """On CUDA the plan and the merge run the Triton kernels under torch.compile too, as opaque custom
    ops (here on the CPU through Triton's interpreter): no graph break, the eager result."""
    monkeypatch.setattr(kernels, "available", lambda x: True)
    unet = unet_from_config("sd15", tiny=True).eval()
    agentsd.apply_patch(unet, 0.5, **stage, seed=0)
    inputs = unet_inputs("sd15", latent=(12, 12))
    eager = run_unet(unet, inputs)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(unet, backend=record, fullgraph=True)
    torch.testing.assert_close(run_unet(compiled, inputs), eager, rtol=1e-5, atol=1e-5)
    called = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    assert {f"agentsd.{op}.default" for op in ("plan", "merge", "unmerge")} <= called


# (apply_patch settings, the kernels' ops on): through Triton's interpreter they take most of the suite's time,
# so the paper schedule as one graph (a cond over symbolic sizes) runs on the torch merge
NEW_SIZES = {
    "a stage, kernels": (dict(ratio=0.5, sx=2, sy=2, agent_ratio=0.5), True),
    "the paper schedule": (dict(min_tokens=0), False),
}


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
@pytest.mark.parametrize("case", NEW_SIZES)
def test_new_sizes_compile_no_more_graphs_than_unpatched(monkeypatch, one_graph, case):
    """From a second size on torch.compile makes the sizes symbols (dynamic shapes): the patched UNet,
    kernels' ops included (here through Triton's interpreter) and the paper schedule as one graph, then
    serves every size with the graphs the unpatched UNet needs, not one more per size (recompile_limit
    would stop that at 8), and gives the torch merge's eager result at each."""
    settings, use_kernels = NEW_SIZES[case]
    sizes = [(16, 16), (24, 24), (32, 16)]  # the second makes both sizes symbols (8 would be 1 at the bottom)
    graphs = {}
    for patched in (False, True):
        torch._dynamo.reset()
        counters.clear()
        unet = unet_from_config("sd15", tiny=True).eval()
        if patched:
            agentsd.apply_patch(unet, **settings, seed=0)
        monkeypatch.setattr(kernels, "available", lambda x: False)  # the torch merge: their reference, and fast
        eager = [run_unet(unet, unet_inputs("sd15", latent=size)) for size in sizes]
        monkeypatch.setattr(kernels, "available", lambda x: use_kernels)
        compiled = torch.compile(unet, backend="eager", fullgraph=True)  # dynamo traces the ops through their fakes
        graphs[patched] = []  # after each size
        for size, expected in zip(sizes, eager):
            torch.testing.assert_close(run_unet(compiled, unet_inputs("sd15", latent=size)), expected, rtol=1e-5, atol=1e-5)
            graphs[patched].append(counters["stats"]["unique_graphs"])
        assert not counters["graph_break"]
    assert graphs[True] == graphs[False] == [1, 2, 2]


def test_dynamic_shapes_compile_to_the_eager_result():
    """torch.compile(dynamic=True) on the agent stage (the torch merge): the grid's factor comes from
    symbolic sizes; computed through a square root it made sympy simplify for minutes (this hung)."""
    unet = unet_from_config("sd15", tiny=True).eval()
    agentsd.apply_patch(unet, 0.5, sx=4, sy=4, agent_ratio=0.95, seed=0)
    inputs = unet_inputs("sd15", latent=(24, 16))
    eager = run_unet(unet, inputs)
    compiled = torch.compile(unet, backend="eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(run_unet(compiled, inputs), eager, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"]


@pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
def test_regional_compilation_of_one_graph_gives_the_eager_result(monkeypatch, one_graph):
    """compile_repeated_blocks with inductor and the kernels' ops (Triton's interpreter), both stages in one
    graph. A block's input is a graph input there, strided (SD 1.5's proj_in is a convolution): inductor
    laid the cond's contiguous operand out as that input, not as its branches were traced, and
    assert_size_stride failed (torch 2.11-2.13, on GPUs too); operands go in flattened."""
    monkeypatch.setattr(kernels, "available", lambda x: True)
    unet = unet_from_config("sd15", tiny=True).eval()
    agentsd.apply_patch(unet, 0.5, min_tokens=0, seed=0)
    sample, _, context, kwargs = unet_inputs("sd15", latent=(12, 12))
    timesteps = torch.tensor([981, 21])  # a list: stages 0 and 1
    eager = [run_unet(unet, (sample, t, context, kwargs)) for t in timesteps]
    unet.compile_repeated_blocks(fullgraph=True)
    for t, expected in zip(timesteps, eager):
        torch.testing.assert_close(run_unet(unet, (sample, t, context, kwargs)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("one_graph_for_stages", [False, True], ids=["graph per stage", "one graph"])
def test_regional_compilation_graphs(monkeypatch, sd_pipe, one_graph_for_stages):
    """diffusers' compile_repeated_blocks compiles each BasicTransformerBlock on its own: under the paper's
    schedule the merged level's blocks compile again for the second stage, or, with one graph for both,
    no block compiles twice."""
    monkeypatch.setattr(agentsd.schedule, "ONE_GRAPH_FOR_STAGES", one_graph_for_stages)

    def generate(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=5, height=64, width=64, output_type="latent", generator=generator).images

    graphs = {}
    for patched in (False, True):
        torch._dynamo.reset()
        counters.clear()
        pipe = copy.deepcopy(sd_pipe)
        if patched:
            agentsd.apply_patch(pipe)
        eager = generate(pipe)
        pipe.unet.compile_repeated_blocks(backend="eager", fullgraph=True)
        for _ in range(2):
            torch.testing.assert_close(generate(pipe), eager, rtol=0, atol=0)
        assert not counters["graph_break"]
        graphs[patched] = counters["stats"]["unique_graphs"]
    assert graphs[True] == graphs[False] + (0 if one_graph_for_stages else 1)
