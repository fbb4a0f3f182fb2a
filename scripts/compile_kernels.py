"""Compile the selection and matching kernels for sm_90 (H100) on a machine without a GPU.

Triton's CPU interpreter (the test suite's) does not type-check like the compiler does; this
catches such errors before a GPU call is spent on them. About 90 s on two cores:

    env -u TRITON_INTERPRET python scripts/compile_kernels.py
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from agentsd import kernels as k

target = GPUTarget("cuda", 90, 32)
failures = []


def check(fn, signature, constexprs, **options):
    while type(fn).__name__ != "JITFunction":
        fn = fn.fn
    src = ASTSource(fn, signature, constexprs)
    try:
        triton.compile(src, target=target, options=options)
        print("ok", fn.__name__, constexprs, flush=True)
    except Exception as e:
        msg = str(e)
        if "ptxas" in msg or "PTXAS" in msg or "nvcc" in msg.lower() or "libcuda" in msg:
            print("frontend ok (no ptxas)", fn.__name__, constexprs, msg[:100])
        else:
            print("FAIL", fn.__name__, constexprs, msg[-1500:])
            failures.append(fn.__name__)


def P(dtype):
    return "*" + dtype


for PASS in range(3):
    for agents in (False, True):
        check(k._histogram_kernel, {"score_ptr": P("fp32"), "hist_ptr": P("i32"), "done_ptr": P("i32"), "threshold_ptr": P("i64"),
              "N": "i32", "num_merged": "i32", "num_agent_merged": "i32", "PASS": "constexpr", "HAS_AGENTS": "constexpr", "BLOCK": "constexpr"},
              {"PASS": PASS, "HAS_AGENTS": agents, "BLOCK": 1024})
for agents in (False, True):
    check(k._below_counts_kernel, {"score_ptr": P("fp32"), "is_dst_ptr": P("i1"), "threshold_ptr": P("i64"), "counts_ptr": P("i32"),
          "N": "i32", "HAS_AGENTS": "constexpr", "BLOCK": "constexpr"}, {"HAS_AGENTS": agents, "BLOCK": 1024})
    check(k._slots_kernel, {"score_ptr": P("fp32"), "best_ptr": P("i64"), "is_dst_ptr": P("i1"), "dst_slot_ptr": P("i64"),
          "threshold_ptr": P("i64"), "counts_ptr": P("i32"), "slot_ptr": P("i64"), "agent_slot_ptr": P("i64"), "N": "i32", "D": "i32",
          "HAS_AGENTS": "constexpr", "BLOCK": "constexpr", "MAX_PROGRAMS": "constexpr"}, {"HAS_AGENTS": agents, "BLOCK": 1024, "MAX_PROGRAMS": 16})
    check(k._one_program_slots_kernel, {"score_ptr": P("fp32"), "best_ptr": P("i64"), "is_dst_ptr": P("i1"), "dst_slot_ptr": P("i64"),
          "slot_ptr": P("i64"), "agent_slot_ptr": P("i64"), "N": "i32", "D": "i32", "num_merged": "i32", "num_agent_merged": "i32",
          "HAS_AGENTS": "constexpr", "BLOCK": "constexpr"}, {"HAS_AGENTS": agents, "BLOCK": 4096}, num_warps=8)
for ieee, even_d in ((False, True), (False, False), (True, False)):
    dt = "fp32" if ieee else "fp16"
    pointers = {"x_ptr": P(dt), "dst_ptr": P(dt), "dst_index_ptr": P("i64"), "score_ptr": P("fp32"), "best_ptr": P("i64")}
    grid = {"W": "i32"}
    strides = {"stride_xb": "i32", "stride_xn": "i32", "stride_db": "i32", "stride_dd": "i32"}
    flags = {"SY": 2, "SX": 2, "IEEE": ieee, "EVEN_D": even_d}
    check(k._best_destination_resident_kernel, {**pointers, "N": "i32", "D": "i32", **grid, **strides, "stride_xc": "i32", **{f: "constexpr" for f in flags},
          "C_A": "constexpr", "C_B": "constexpr", "C_REST": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
          {**flags, "C_A": 128, "C_B": 128, "C_REST": 64, "BLOCK_M": 128, "BLOCK_D": 64}, num_warps=8)
    check(k._best_destination_kernel, {**pointers, "N": "i32", "D": "i32", "C": "i32", **grid, **strides, **{f: "constexpr" for f in flags},
          "BLOCK_M": "constexpr", "BLOCK_D": "constexpr", "BLOCK_C": "constexpr"},
          {**flags, "BLOCK_M": 128, "BLOCK_D": 64, "BLOCK_C": 64})
check(k._unit_destinations_kernel, {"x_ptr": P("fp16"), "index_ptr": P("i64"), "out_ptr": P("fp16"), "score_ptr": P("fp32"), "best_ptr": P("i64"),
      "N": "i32", "D": "i32", "C": "i32", "stride_xb": "i32", "stride_xn": "i32", "stride_xc": "i32", "BLOCK_D": "constexpr", "BLOCK_C": "constexpr"},
      {"BLOCK_D": 32, "BLOCK_C": 64})
sys.exit(1 if failures else 0)
