"""What every phase needs to launch its kernels: Triton (None where it is not installed), whether its
CPU interpreter runs them, grid arithmetic on the host, and the device a launch runs on."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: merge.py runs its torch code
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the tests call kernels directly
TOKEN_BLOCK = 1024 if not INTERPRET else 64  # tokens per program of the kernels over token positions


# triton.cdiv and triton.next_power_of_2 are constexpr functions: ~1 us of host time per call
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def run_on(device: int, fn, args: tuple, kwargs: dict):
    """fn(*args, **kwargs) with CUDA device `device` current (-1: as it is). Triton launches on the
    current device, not on its tensors' (a pipeline moved to cuda:1 leaves the current device at 0)."""
    if device < 0 or device == torch._C._cuda_getDevice():
        return fn(*args, **kwargs)
    with torch.cuda.device(device):
        return fn(*args, **kwargs)


def device_index(x) -> int:
    """The CUDA device index of a tensor or device; -1 for the CPU or the current device ("cuda")."""
    if isinstance(x, torch.Tensor):
        return x.get_device()
    index = torch.device(x).index
    return -1 if index is None else index
