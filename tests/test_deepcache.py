"""agentsd composed with step caching (the public DeepCache package): either order of enabling and
disabling, the schedule still following the scheduler, and the two limits of the composition."""

import numpy as np
import pytest

import conftest

import agentsd
from agentsd.models import tiny_pipeline
from agentsd.pipelines import enable_deepcache

DeepCache = pytest.importorskip("DeepCache")

PATCH = dict(ratio=0.5, seed=0, min_tokens=0)  # explicit: the module-scoped references run before conftest sets it


def generate(pipe, steps=9):  # enough steps for several cache intervals
    return conftest.generate(pipe, steps)


def deepcache(pipe, interval=3):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper


@pytest.fixture(scope="module")
def references():
    """Images of the plain pipeline, agentsd alone and DeepCache alone."""
    pipe = tiny_pipeline("sd15")
    plain = generate(pipe)
    helper = deepcache(pipe)
    cached = generate(pipe)
    helper.disable()
    agentsd.apply_patch(pipe, **PATCH)
    return dict(plain=plain, cached=cached, agentsd=generate(pipe))


@pytest.mark.parametrize("agentsd_first", [True, False])
@pytest.mark.parametrize("remove_agentsd_first", [True, False])
def test_either_order_of_enabling_and_disabling(references, agentsd_first, remove_agentsd_first):
    pipe = tiny_pipeline("sd15")
    if agentsd_first:
        agentsd.apply_patch(pipe, **PATCH)
        helper = deepcache(pipe)
    else:
        helper = deepcache(pipe)
        agentsd.apply_patch(pipe, **PATCH)
    both = generate(pipe)
    assert np.abs(both - references["cached"]).max() > 1e-3 and np.abs(both - references["agentsd"]).max() > 1e-3
    if remove_agentsd_first:
        agentsd.remove_patch(pipe)
        np.testing.assert_array_equal(generate(pipe), references["cached"])
        helper.disable()
    else:
        helper.disable()
        np.testing.assert_array_equal(generate(pipe), references["agentsd"])
        agentsd.remove_patch(pipe)
    np.testing.assert_array_equal(generate(pipe), references["plain"])


def test_the_composition_in_either_order_gives_the_same_images():
    first, second = tiny_pipeline("sd15"), tiny_pipeline("sd15")
    agentsd.apply_patch(first, **PATCH)
    deepcache(first)
    deepcache(second)
    agentsd.apply_patch(second, **PATCH)
    np.testing.assert_array_equal(generate(first), generate(second))


def test_the_limits_of_the_composition(references):
    """agentsd at ratio 0 composed is DeepCache alone; DeepCache at interval 1 composed is agentsd alone."""
    pipe = tiny_pipeline("sd15")
    agentsd.apply_patch(pipe, ratio=0.0)
    helper = deepcache(pipe)
    np.testing.assert_array_equal(generate(pipe), references["cached"])
    helper.disable()
    agentsd.apply_patch(pipe, **PATCH)
    deepcache(pipe, interval=1)
    np.testing.assert_array_equal(generate(pipe), references["agentsd"])


def test_the_schedule_follows_the_scheduler_under_deepcache():
    pipe = tiny_pipeline("sd15")
    agentsd.apply_patch(pipe, **PATCH)
    deepcache(pipe)
    patch = pipe.unet._agentsd
    stages = []
    pipe.unet.register_forward_pre_hook(lambda *_: stages.append(patch.call.stage_index))
    generate(pipe, steps=10)
    assert stages == [0] * 5 + [1] * 6  # PNDM: 11 timesteps for 10 steps, the first 40% with agents


def test_enable_deepcache_checks_its_arguments():
    pipe = tiny_pipeline("sd15")
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        enable_deepcache(pipe, 0)
    helper = enable_deepcache(pipe, 2)
    assert isinstance(helper, DeepCache.DeepCacheSDHelper) and helper.params["cache_interval"] == 2
