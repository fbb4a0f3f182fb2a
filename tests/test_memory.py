"""Peak memory of a patched call: no higher than the unpatched call's (issue 5), counted exactly.

The GPU number (torch.cuda.max_memory_allocated) depends on the caching allocator; here every
tensor the call creates is counted by storage, from creation until it is freed, on the CPU.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import agentsd
from conftest import run_unet, tiny_unet, unet_inputs


class PeakBytes(TorchDispatchMode):
    """The most bytes of storage alive at once among those created inside the mode."""

    def __init__(self):
        super().__init__()
        self.alive, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.alive:
                    self.alive[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out

    def _free(self, key):
        self.now -= self.alive.pop(key)


def peak_bytes(unet, inputs):
    run_unet(unet, inputs)  # on CUDA the first call compiles and autotunes the kernels (256 MB of benchmark buffers)
    with PeakBytes() as counter:
        run_unet(unet, inputs)
    return counter.peak


@pytest.mark.parametrize("stage", [dict(sx=4, sy=4, agent_ratio=0.95), dict(sx=2, sy=2, agent_ratio=0.5)], ids=["agent", "tome"])
def test_patched_call_peaks_no_higher_than_baseline(stage):
    unet = tiny_unet("sd15")
    inputs = unet_inputs("sd15", latent=(32, 32))
    baseline = peak_bytes(unet, inputs)
    agentsd.apply_patch(unet, 0.5, **stage, seed=0)
    assert peak_bytes(unet, inputs) <= baseline
