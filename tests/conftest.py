"""Tiny random-weight models for the tests, built locally (no downloads)."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels in its CPU interpreter (read at triton import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # One thread per worker (and its subprocesses): torch's default of one per core, in every worker,
    # oversubscribes the cores (pytest -n 2 on 2 cores took 17 minutes, against 4 with one thread each).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

import agentsd.config
from agentsd.models import TINY_UNET_CONFIGS, tiny_pipeline, unet_from_config

KINDS = ("sd15", "sd21", "sdxl")
# AGENTSD_TEST_DEVICE=cuda runs the model tests on the GPU (with the Triton kernels).
DEVICE = os.environ.get("AGENTSD_TEST_DEVICE", "cpu")
if DEVICE == "cuda":  # TF32 convolutions round at 1e-3, far above the 1e-4 of the parity tests
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True, scope="session")
def own_kernel_config_cache(tmp_path_factory):
    """Kernel configs chosen in the tests (some without tuning, below) stay out of the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AGENTSD_CACHE_DIR", str(tmp_path_factory.mktemp("agentsd-cache")))
        yield


def _smallest_tiles(tuned, grid, args, meta):
    """The candidate with the smallest tiles (it fits every GPU): a valid choice of the tuner's."""
    fits = [c for c in tuned.configs if not c.kwargs.get("SHARED_ROWS")]
    return min(fits, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_D"] * c.num_stages)


@pytest.fixture(autouse=True)
def untuned_kernels_on_the_gpu(request, monkeypatch):
    """On a GPU, Triton's autotuner compiles and times every candidate of a matching kernel at each new
    shape, and the parity tests take dozens of shapes: they launch one candidate instead (the results
    do not depend on it). tests/test_gpu.py keeps the tuner, as users run it."""
    if DEVICE == "cuda" and request.path.name != "test_gpu.py":
        from agentsd.kernels import matching

        monkeypatch.setattr(matching, "_autotune", _smallest_tiles)


@pytest.fixture(autouse=True)
def merge_tiny_models(monkeypatch):
    """The tiny models' blocks see a few dozen tokens, far below the default min_tokens: merge there
    as the paper does at any size (tests of the default rule set min_tokens themselves)."""
    monkeypatch.setattr(agentsd.config, "MIN_TOKENS", 0)


def tiny_unet(kind):
    return unet_from_config(kind, tiny=True).to(DEVICE).eval()


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
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {k: v.to(DEVICE) for k, v in kwargs["added_cond_kwargs"].items()}
    return sample.to(DEVICE), torch.tensor(981, device=DEVICE), context.to(DEVICE), kwargs


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def unet(kind):
    return tiny_unet(kind)


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


def generate(pipe, steps=4, size=32, **kwargs):
    """Images of a tiny pipeline as a numpy array, from seed 0 unless `generator` is given."""
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe("a cat", num_inference_steps=steps, height=size, width=size, output_type="np", **kwargs).images
