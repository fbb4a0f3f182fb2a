"""pytest plugin: run diffusers' own tests with agentsd at ratio=0 on every UNet2DConditionModel and
every pipeline they build. ratio=0 must leave every output bit-identical, so any test that passes
unpatched and fails here is an agentsd bug (README "Compatibility"; usage in run.sh beside this).

AGENTSD_SUITE_SETTINGS (JSON of apply_patch's keywords, default {"ratio": 0}) runs them with merging on,
e.g. {"ratio": 0.5, "min_tokens": 0}: then tests against stored output slices may fail, but nothing
may crash, and tests that compare two runs of one pipeline (batch and single, slicing, save and load)
must still pass (docs/results/diffusers_suite_merging_2026-12-06.txt).

A UNet is patched when its constructor returns, a pipeline when its outermost constructor returns
(re-patching the UNet through the pipeline, as users do). Counts go to $AGENTSD_SUITE_COUNTS (JSON)."""

import collections
import functools
import inspect
import json
import os
import threading
from pathlib import Path

import diffusers
from diffusers import DiffusionPipeline, UNet2DConditionModel

import agentsd

SETTINGS = json.loads(os.environ.get("AGENTSD_SUITE_SETTINGS", '{"ratio": 0}'))
COUNTS = collections.Counter()
_depth = threading.local()  # constructors in progress: only the outermost one patches


def _patching_init(cls, patch):
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _depth.n -= 1
        if _depth.n == 0:
            patch(self)

    cls.__init__ = __init__


def _patch_unet(unet):
    try:
        agentsd.apply_patch(unet, **SETTINGS)
        COUNTS["unet_patched"] += 1
    except ValueError:  # no transformer blocks: nothing to patch
        COUNTS["unet_without_blocks"] += 1


def _patch_pipeline(pipe):
    if isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        try:
            agentsd.apply_patch(pipe, **SETTINGS)
            COUNTS["pipe_patched"] += 1
        except ValueError:  # a UNet without BasicTransformerBlocks (the x2 latent upscaler): a user gets this error
            COUNTS[f"pipe_without_blocks {type(pipe).__name__}"] += 1
    else:
        COUNTS[f"pipe_not_unet {type(pipe).__name__} {type(getattr(pipe, 'unet', None)).__name__}"] += 1


def pytest_configure(config):
    _patching_init(UNet2DConditionModel, _patch_unet)
    pipelines = {DiffusionPipeline}
    for name in dir(diffusers):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # optional backends missing
            continue
        if inspect.isclass(obj) and issubclass(obj, DiffusionPipeline):
            pipelines.update(c for c in obj.__mro__ if issubclass(c, DiffusionPipeline))
    for cls in pipelines:
        if "__init__" in cls.__dict__:
            _patching_init(cls, _patch_pipeline)


def pytest_unconfigure(config):
    path = os.environ.get("AGENTSD_SUITE_COUNTS")
    if not path:
        return
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker:  # pytest-xdist: each worker writes its own counts, the controller (unconfigured last) sums them
        Path(f"{path}.{worker}").write_text(json.dumps(COUNTS))
        return
    for part in Path(path).parent.glob(f"{Path(path).name}.gw*"):
        COUNTS.update(json.loads(part.read_text()))
        part.unlink()
    Path(path).write_text(json.dumps(dict(COUNTS, agentsd=agentsd.__file__, settings=SETTINGS), indent=1))
