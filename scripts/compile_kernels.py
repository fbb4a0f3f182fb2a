"""Compile agentsd's Triton kernels for sm_90 (H100) on a machine without a GPU.

Triton's CPU interpreter (the test suite's) does not type-check like the compiler does; this
catches such errors before a GPU call is spent on them. Signatures come from each kernel's argument
names: `*_ptr` arguments are pointers (types below), other runtime arguments int32.

    env -u TRITON_INTERPRET python scripts/compile_kernels.py
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from agentsd.kernels import matching_kernels, merging, planning, selection, unmerging

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {  # pointer element types, by argument name (fp16 metric and x)
    "x_ptr": "fp16", "dst_ptr": "fp16", "dst_unit_ptr": "fp16", "merged_ptr": "fp16", "agents_ptr": "fp16",
    "y_ptr": "fp16", "residual_ptr": "fp16", "out_ptr": "fp16", "timestep_ptr": "i64", "score_ptr": "fp32",
    "part_score_ptr": "fp32", "threshold_ptr": "i64", "sums_ptr": "i64",
}  # fmt: skip
failures = []


def check(kernel, constexprs, **options):
    fn = kernel
    while type(fn).__name__ != "JITFunction":
        fn = fn.fn
    compile_for(fn, constexprs, options)
    # Triton specializes an int argument equal to 1 into the constant 1 (a Python int in the kernel,
    # without tensor methods such as .to): compile once more with every int argument 1
    ints = [name for name in fn.arg_names if name not in constexprs and not name.endswith("_ptr")]
    compile_for(fn, {**constexprs, **dict.fromkeys(ints, 1)}, options, "(ints = 1)")


def compile_for(fn, constexprs, options, label=""):
    signature = {
        name: "constexpr" if name in constexprs else "*" + POINTERS.get(name, "i32") if name.endswith("_ptr") else "i32"
        for name in fn.arg_names
    }
    try:
        triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options)
        print("ok", fn.__name__, label or constexprs, flush=True)
    except Exception as e:
        message = str(e)
        if "ptxas" in message or "PTXAS" in message or "nvcc" in message.lower() or "libcuda" in message:
            print("frontend ok (no ptxas)", fn.__name__, label or constexprs, message[:100])
        else:
            print("FAIL", fn.__name__, label or constexprs, message[-1500:])
            failures.append(fn.__name__)


for key in (0, 1, 2):
    check(planning._prologue_kernel, {"SY": 4, "SX": 4, "KEY": key, "CELL": 16, "BLOCK_D": 8, "BLOCK_C": 64, "BLOCK_REST": 1024})
for agents in (False, True):
    for radix_pass in range(3):
        check(selection._histogram_kernel, {"PASS": radix_pass, "HAS_AGENTS": agents, "BLOCK": 1024})
    check(selection._below_counts_kernel, {"HAS_AGENTS": agents, "BLOCK": 1024})
    check(selection._slots_kernel, {"HAS_AGENTS": agents, "BLOCK": 1024, "MAX_PROGRAMS": 16})
    check(selection._one_program_slots_kernel, {"HAS_AGENTS": agents, "BLOCK": 4096}, num_warps=8)
    check(merging._scatter_kernel, {"HAS_AGENTS": agents, "SCALE": 2.0**24, "BLOCK_T": 32, "BLOCK_C": 64})
    check(merging._destination_mean_kernel, {"HAS_AGENTS": agents, "SCALE": 2.0**24, "BLOCK_D": 4, "BLOCK_C": 64})
for residual in (False, True):
    check(unmerging._unmerge_kernel, {"RESIDUAL": residual, "BLOCK_T": 32, "BLOCK_C": 64})
for even_d in (True, False):
    flags = {"SY": 2, "SX": 2, "IEEE": False, "EVEN_D": even_d}
    for select in (False, True):
        check(matching_kernels._best_destination_resident_kernel, {**flags, "C_A": 128, "C_B": 128, "C_REST": 64, "SELECT": select,
              "HAS_AGENTS": True, "SELECT_BLOCK": 4096, "BLOCK_M": 128, "BLOCK_D": 64, "SHARED_ROWS": False}, num_warps=8)  # fmt: skip
    check(matching_kernels._best_destination_kernel, {**flags, "BLOCK_M": 128, "BLOCK_D": 64, "BLOCK_C": 64})
check(matching_kernels._combine_splits_kernel, {"SY": 2, "SX": 2, "BLOCK": 1024})
sys.exit(1 if failures else 0)
