"""The merge phase on the GPU: the merged sequence and the agents in one pass over x.

Unmerged sources are copied to their slot; merged sources are summed into their destination with
atomics on 64-bit fixed point: integer addition does not depend on the order of the atomics, so
results are deterministic (float atomics are not). The agents reuse the sums of the first plan (its
merged sources are theirs too). The atomics are relaxed: nothing orders them (acq_rel, Triton's
default, made the merge 2-3x slower). A second launch divides by the counts and leaves the sums zero
for the plan's next merge (the plan's prologue zeroes them first)."""

import torch

from .launch import INTERPRET, cdiv, tl, triton
from .layout import PlanShape, layout_for, views

# 2**24 steps per unit: fp16's largest value summed over 65536 tokens stays inside int64 (7e16 < 9e18)
_FIXED_POINT = float(2**24)

if triton is not None:

    @triton.jit
    def zero_rows(rows, ok, width, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Zero `width` int64 values from each of the row pointers `rows` where `ok` (the merge's sums:
        the plan's prologue zeroes them first, the destination means again after each merge)."""
        for c0 in range(0, width, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            tl.store(rows[:, None] + cols[None, :], tl.zeros([BLOCK_ROWS, BLOCK], tl.int64), mask=ok[:, None] & (cols[None, :] < width))

    @triton.jit
    def _scatter_kernel(
        x_ptr, slot_ptr, agent_slot_ptr, token_cell_ptr, merged_ptr, agents_ptr, sums_ptr,
        N, C, D, num_slots, num_agents, sums_width, stride_xb, stride_xn,
        HAS_AGENTS: tl.constexpr, SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Unmerged sources are copied to their slot; merged sources are added into sums (B, D, W):
        per destination [sum (C), count] of the first plan, then [sum (C), count] of the sources only
        the agents merge (rows sums_width wide: the plan's, whether or not this merge forms agents)."""
        b = tl.program_id(2)
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = tokens < N
        col_ok = cols < C
        source = ok & (tl.load(token_cell_ptr + tokens, mask=ok, other=0) < 0)
        slot = tl.load(slot_ptr + b * N + tokens, mask=ok, other=0)
        x = tl.load(x_ptr + b * stride_xb + tokens[:, None] * stride_xn + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        fixed = (x.to(tl.float32) * SCALE).to(tl.int64)

        joins = source & (slot < D)
        sums = sums_ptr + (b * D + slot) * sums_width
        tl.atomic_add(sums[:, None] + cols[None, :], fixed, mask=joins[:, None] & col_ok[None, :], sem="relaxed")
        if tl.program_id(1) == 0:
            tl.atomic_add(sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=joins, sem="relaxed")
        stays = source & (slot >= D)
        tl.store(merged_ptr + (b * num_slots + slot[:, None]) * C + cols[None, :], x, mask=stays[:, None] & col_ok[None, :])
        if HAS_AGENTS:
            agent_slot = tl.load(agent_slot_ptr + b * N + tokens, mask=ok, other=0)
            only_agents = stays & (agent_slot < D)
            agent_sums = sums_ptr + (b * D + agent_slot) * sums_width + C + 1
            tl.atomic_add(agent_sums[:, None] + cols[None, :], fixed, mask=only_agents[:, None] & col_ok[None, :], sem="relaxed")
            if tl.program_id(1) == 0:
                tl.atomic_add(agent_sums + C, tl.full([BLOCK_T], 1, tl.int64), mask=only_agents, sem="relaxed")
            alone = stays & (agent_slot >= D)
            tl.store(agents_ptr + (b * num_agents + agent_slot[:, None]) * C + cols[None, :], x, mask=alone[:, None] & col_ok[None, :])

    @triton.jit
    def _destination_mean_kernel(
        x_ptr, index_ptr, sums_ptr, merged_ptr, agents_ptr,
        D, C, num_slots, num_agents, sums_width, stride_xb, stride_xn,
        HAS_AGENTS: tl.constexpr, SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Each destination slot: (own value + sum of its merged sources) / (1 + their count). Each
        program reads its destinations' sums once and then zeroes them for the plan's next merge
        (cross-attention, feed-forward)."""
        b = tl.program_id(1)
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = d < D
        token = tl.load(index_ptr + d, mask=ok, other=0)
        sums = sums_ptr + (b * D + d) * sums_width
        count = 1 + tl.load(sums + C, mask=ok, other=0)
        if HAS_AGENTS:
            agent_count = count + tl.load(sums + 2 * C + 1, mask=ok, other=0)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = ok[:, None] & (cols[None, :] < C)
            at = sums[:, None] + cols[None, :]
            own = tl.load(x_ptr + b * stride_xb + token[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
            total = (own.to(tl.float32) * SCALE).to(tl.int64) + tl.load(at, mask=mask, other=0)
            mean = total.to(tl.float32) * (1.0 / SCALE) / count[:, None].to(tl.float32)
            tl.store(merged_ptr + (b * num_slots + d[:, None]) * C + cols[None, :], mean.to(merged_ptr.dtype.element_ty), mask=mask)
            if HAS_AGENTS:
                total += tl.load(at + C + 1, mask=mask, other=0)
                mean = total.to(tl.float32) * (1.0 / SCALE) / agent_count[:, None].to(tl.float32)
                tl.store(agents_ptr + (b * num_agents + d[:, None]) * C + cols[None, :], mean.to(agents_ptr.dtype.element_ty), mask=mask)
        # Threads hold copies of the counts: all have read before any zeroes (no order between threads otherwise).
        tl.debug_barrier()
        zero_rows(sums, ok, sums_width, BLOCK_D, BLOCK_C)


def run_merge(x, workspace, num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged, with_agents):
    """The merged sequence and the agents (or None) of x by the plan in `workspace` (its shape
    flattened, as the op takes it): each slot the mean of its tokens, deterministic. Destinations
    hold slots 0..D-1 in both plans."""
    shape = PlanShape(x.shape[0], num_tokens, channels, dtype, width, sy, sx, num_merged, num_agent_merged)
    if x.shape[1:] != (num_tokens, channels):
        raise ValueError(f"merge: x of shape {tuple(x.shape)} does not fit a plan of {num_tokens} tokens x {channels} channels")
    parts = views(workspace, layout_for(shape, x.device))
    batch = x.shape[0]
    num_slots = num_tokens - num_merged
    num_agents = num_tokens - num_agent_merged if with_agents else None
    merged = torch.empty(batch, num_slots, channels, device=x.device, dtype=x.dtype)
    agents = torch.empty(batch, num_agents, channels, device=x.device, dtype=x.dtype) if with_agents else merged
    if x.stride(-1) != 1:
        x = x.contiguous()
    sums, num_dst, slot = parts["sums"], shape.num_dst, parts["slot"]
    block_t, block_c = (32, 64) if not INTERPRET else (16, 16)
    _scatter_kernel[(cdiv(num_tokens, block_t), cdiv(channels, block_c), batch)](
        x, slot, parts["agent_slot"] if with_agents else slot, parts["token_cell"], merged, agents, sums,
        num_tokens, channels, num_dst, merged.shape[1], agents.shape[1], sums.shape[-1], x.stride(0), x.stride(1),
        HAS_AGENTS=with_agents, SCALE=_FIXED_POINT, BLOCK_T=block_t, BLOCK_C=block_c,
    )  # fmt: skip
    # 4 destinations per program: enough programs for the few destinations of the agent stage (256 at
    # 4096 tokens): merge 45 -> 40 us at SDXL 1024px level 2, ToMe stage 26 -> 20 us (16 before; H100)
    block_d = 4
    _destination_mean_kernel[(cdiv(num_dst, block_d), batch)](
        x, parts["dst_index"], sums, merged, agents, num_dst, channels, merged.shape[1], agents.shape[1], sums.shape[-1],
        x.stride(0), x.stride(1), HAS_AGENTS=with_agents, SCALE=_FIXED_POINT, BLOCK_D=block_d, BLOCK_C=block_c,
    )  # fmt: skip
    return merged, (agents if with_agents else None)
