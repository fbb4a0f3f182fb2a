"""Steps 3-4 of a plan on the GPU: which sources merge (the t best scores) and every token's slot.

Token order in the merged sequence is free (ALGORITHM.md), so the unmerged sources take slots D,
D+1, ... in token order, and only the set of the t best (ties: lower index first) is needed, found
without a sort. Up to layout.ONE_PROGRAM_MAX_TOKENS one program per batch row holds all tokens and
does everything (one launch, select_row; run by the resident matching's last program of the row
where it can). Beyond, a radix selection of the t-th score over its 32 bits in three histogram
passes (11, 11, 10 bits): each pass is a launch over all tokens whose last program to finish reads
the histogram and leaves the bits found so far in `threshold`; two more launches count and assign.
"""

from typing import TYPE_CHECKING

from .launch import TOKEN_BLOCK, next_power_of_2, tl, triton

if TYPE_CHECKING:  # layout imports the matching kernels, which import select_row from here
    from .layout import Layout, PlanShape

if triton is not None:

    @triton.jit
    def _order_key(score):
        """float32 -> int64 in [0, 2**32), ordered as the scores (-0.0 counts as 0.0, as in a sort)."""
        bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(bits < 0, ~bits, bits | 0x80000000) & 0xFFFFFFFF

    @triton.jit
    def _pass_bits(PASS: tl.constexpr):
        return 11 if PASS < 2 else 10

    @triton.jit
    def _pass_shift(PASS: tl.constexpr):
        return 21 if PASS == 0 else (10 if PASS == 1 else 0)

    @triton.jit
    def _digit(key, PASS: tl.constexpr):
        return ((key >> _pass_shift(PASS)) & ((1 << _pass_bits(PASS)) - 1)).to(tl.int32)

    @triton.jit
    def _has_prefix(key, prefix, PASS: tl.constexpr):
        """Whether the bits of key above this pass's digit are those found so far."""
        return (key >> (_pass_shift(PASS) + _pass_bits(PASS))) == prefix

    @triton.jit
    def _choose_bin(in_bin, prefix, remaining, PASS: tl.constexpr):
        """From one pass's histogram (2048 bins, int64): the bits found so far with this pass's digit
        of the `remaining`-th largest key appended, and how many keys of that digit are still to take."""
        bins = tl.arange(0, 2048)
        through = tl.cumsum(in_bin, 0, reverse=True)  # keys in this bin or above
        above = through - in_bin
        chosen = tl.max(tl.where((above < remaining) & (through >= remaining), bins, -1), 0).to(tl.int64)
        return (prefix << _pass_bits(PASS)) | chosen, remaining - tl.sum(tl.where(bins == chosen, above, 0), 0)

    @triton.jit
    def _selection_keys(score_ptr, token_cell_ptr, b, p, ok, N):
        """Order keys of tokens p, which of them are sources, and the cell of those that are not."""
        cell = tl.load(token_cell_ptr + p, mask=ok, other=0)
        # from L2: other programs of the launch may have just written the scores (select_row)
        score = tl.load(score_ptr + b * N + p, mask=ok, other=0.0, cache_modifier=".cg")
        return _order_key(score), ok & (cell < 0), cell

    @triton.jit
    def _slots(key, source, best, own_slot, threshold, equal_wanted, equal_before, below_before, D):
        """Slots of a block of tokens. Sources above the threshold key, and the first `equal_wanted`
        sources equal to it, join their best destination; the other sources take D + (unmerged
        sources before them in token order); destinations keep their cell's slot. equal_before and
        below_before: sources equal to / below the threshold in earlier blocks of the row."""
        equal = source & (key == threshold)
        below = source & (key < threshold)
        # One scan counts both (a program holds fewer than 2**15 tokens): below in the low 16 bits
        packed = below.to(tl.int32) + (equal.to(tl.int32) << 16)
        before = tl.cumsum(packed, 0) - packed
        equal_rank = equal_before + (before >> 16)
        merged = source & ((key > threshold) | (equal & (equal_rank < equal_wanted)))
        unmerged_rank = below_before + (before & 0xFFFF) + tl.maximum(equal_rank - equal_wanted, 0)
        return tl.where(source, tl.where(merged, best, D + unmerged_rank), own_slot)

    @triton.jit
    def _kth_key(key, ok, k, DIGIT_BITS: tl.constexpr):
        """The k-th largest of the keys where ok, and how many keys equal to it are among the k
        largest: from the top, DIGIT_BITS per step, each step a histogram of the next digit of the
        keys that share the digits found so far."""
        bins = tl.arange(0, 1 << DIGIT_BITS)
        found = tl.zeros([], dtype=tl.int64)
        left = k
        for step in tl.static_range(32 // DIGIT_BITS):
            shift = 32 - DIGIT_BITS * (step + 1)
            sharing = ok & ((key >> (shift + DIGIT_BITS)) == (found >> (shift + DIGIT_BITS)))
            count = tl.histogram(((key >> shift) & ((1 << DIGIT_BITS) - 1)).to(tl.int32), 1 << DIGIT_BITS, mask=sharing)
            through = tl.cumsum(count, 0, reverse=True)  # keys of this digit or above
            chosen = tl.max(tl.where(through >= left, bins, -1), 0)
            left -= tl.sum(tl.where(bins == chosen, through - count, 0), 0)
            found |= chosen.to(tl.int64) << shift
        return found, left

    @triton.jit
    def select_row(
        score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, b, N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The selection and slots of batch row b in one program, all N (< 2**15) keys in registers.

        The t-th largest key is found 4 bits at a time (8 histograms of 16 bins per target): 17 us per
        agent-stage plan at 4096 tokens on an H100, against 34 us bit by bit (32 block-wide counts)
        and 30 us with 8-bit digits (docs/results/2026-11-24-h100/selection_digits.md). A warp
        counts its keys for tl.histogram with ballots, not atomics: scores that crowd into one bin
        (the UNet's do) cost the same (the radix passes' histograms over many programs serialised
        on their atomics there)."""
        p = tl.arange(0, BLOCK)
        ok = p < N
        key, source, own_slot = _selection_keys(score_ptr, token_cell_ptr, b, p, ok, N)
        merged_key, merged_equal = _kth_key(key, ok, num_merged, 4)
        if HAS_AGENTS:
            agent_key, agent_equal = _kth_key(key, ok, num_agent_merged, 4)
        best = tl.load(best_ptr + b * N + p, mask=ok, other=0, cache_modifier=".cg")
        slot = _slots(key, source, best, own_slot, merged_key, merged_equal, 0, 0, D)
        tl.store(slot_ptr + b * N + p, slot, mask=ok)
        if HAS_AGENTS:
            slot = _slots(key, source, best, own_slot, agent_key, agent_equal, 0, 0, D)
            tl.store(agent_slot_ptr + b * N + p, slot, mask=ok)

    @triton.jit
    def _one_program_slots_kernel(
        score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, N, D, num_merged, num_agent_merged,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """select_row for batch row program_id(0)."""
        select_row(score_ptr, best_ptr, token_cell_ptr, slot_ptr, agent_slot_ptr, tl.program_id(0), N, D,
                   num_merged, num_agent_merged, HAS_AGENTS, BLOCK)  # fmt: skip

    @triton.jit
    def _histogram_kernel(
        score_ptr, hist_ptr, done_ptr, threshold_ptr, N, num_merged, num_agent_merged,
        PASS: tl.constexpr, HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One radix pass: counts of the next bits of the keys that share the bits found so far.

        hist (B, 5, 2048): pass 0 is shared, passes 1-2 have one row per target (merged, agents).
        threshold (B, 2, 2): per target, the leading bits of the k-th largest key found so far and
        how many keys with those bits are still to be taken; after pass 2 the key itself and how
        many keys equal to it are among the k.
        """
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < N
        key = _order_key(tl.load(score_ptr + b * N + p, mask=ok, other=0.0))
        digit = _digit(key, PASS)
        hist = hist_ptr + b * 5 * 2048
        if PASS == 0:  # every key counts, in a few bins: count inside the program first
            counts = tl.histogram(digit, 2048, mask=ok)
            tl.atomic_add(hist + tl.arange(0, 2048), counts, mask=counts > 0, sem="relaxed")
        else:
            for target in tl.static_range(1 + HAS_AGENTS):
                wanted = ok & _has_prefix(key, tl.load(threshold_ptr + (b * 2 + target) * 2), PASS)
                row = hist + (1 + 2 * target + PASS - 1) * 2048
                tl.atomic_add(row + digit, tl.full([BLOCK], 1, tl.int32), mask=wanted, sem="relaxed")

        tl.debug_barrier()  # this program's counts are in before it reports done
        if tl.atomic_add(done_ptr + b * 3 + PASS, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            for target in tl.static_range(1 + HAS_AGENTS):
                k = tl.cast(num_merged if target == 0 else num_agent_merged, tl.int64)  # a constant where it is 1
                state = threshold_ptr + (b * 2 + target) * 2
                prefix = tl.load(state) if PASS > 0 else 0
                remaining = tl.load(state + 1) if PASS > 0 else k
                row = hist + (0 if PASS == 0 else 1 + 2 * target + PASS - 1) * 2048
                in_bin = tl.load(row + tl.arange(0, 2048), cache_modifier=".cg")  # from L2, where the atomics went
                prefix, remaining = _choose_bin(in_bin.to(tl.int64), prefix, remaining, PASS)
                tl.store(state, prefix)
                tl.store(state + 1, remaining)

    @triton.jit
    def _below_counts_kernel(
        score_ptr, token_cell_ptr, threshold_ptr, counts_ptr, N, HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Per target and block of tokens: the sources equal to the threshold key and below it."""
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        key, source, _ = _selection_keys(score_ptr, token_cell_ptr, b, p, p < N, N)
        for target in tl.static_range(1 + HAS_AGENTS):
            threshold = tl.load(threshold_ptr + (b * 2 + target) * 2)
            out = counts_ptr + ((b * 2 + target) * tl.num_programs(0) + tl.program_id(0)) * 2
            tl.store(out, tl.sum((source & (key == threshold)).to(tl.int32), 0))
            tl.store(out + 1, tl.sum((source & (key < threshold)).to(tl.int32), 0))

    @triton.jit
    def _slots_kernel(
        score_ptr, best_ptr, token_cell_ptr, threshold_ptr, counts_ptr, slot_ptr, agent_slot_ptr, N, D,
        HAS_AGENTS: tl.constexpr, BLOCK: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    ):  # fmt: skip
        """_slots for a block of tokens, after the counts of the earlier blocks."""
        b = tl.program_id(1)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < N
        best = tl.load(best_ptr + b * N + p, mask=ok, other=0)
        key, source, own_slot = _selection_keys(score_ptr, token_cell_ptr, b, p, ok, N)
        earlier = tl.arange(0, MAX_PROGRAMS)
        before = earlier < tl.program_id(0)
        for target in tl.static_range(1 + HAS_AGENTS):
            state = threshold_ptr + (b * 2 + target) * 2
            counts = counts_ptr + ((b * 2 + target) * tl.num_programs(0) + earlier) * 2
            equal_before = tl.sum(tl.load(counts, mask=before, other=0).to(tl.int64), 0)
            below_before = tl.sum(tl.load(counts + 1, mask=before, other=0).to(tl.int64), 0)
            slot = _slots(key, source, best, own_slot, tl.load(state), tl.load(state + 1), equal_before, below_before, D)
            tl.store((slot_ptr if target == 0 else agent_slot_ptr) + b * N + p, slot, mask=ok)


def select(parts: dict, shape: "PlanShape", layout: "Layout") -> None:
    """slot and agent_slot of every token (steps 3-4): the t best-scoring sources join their best
    destination (see merge.assign_slots)."""
    score, best, cell, slot = parts["score"], parts["best"], parts["token_cell"], parts["slot"]
    batch, n_tokens = score.shape
    has_agents = shape.num_agent_merged is not None
    agent_slot = parts.get("agent_slot", slot)
    counts = (shape.num_merged, shape.num_agent_merged or 0)
    if not layout.radix_programs:
        _one_program_slots_kernel[(batch,)](
            score, best, cell, slot, agent_slot, n_tokens, shape.num_dst, *counts,
            HAS_AGENTS=has_agents, BLOCK=next_power_of_2(n_tokens), num_warps=8,
        )  # fmt: skip
        return
    programs, threshold, below = layout.radix_programs, parts["threshold"], parts["below"]
    hist, done = parts["counters"].view(-1).split([batch * 5 * 2048, batch * 3])
    for radix_pass in range(3):
        _histogram_kernel[(programs, batch)](
            score, hist, done, threshold, n_tokens, *counts, PASS=radix_pass, HAS_AGENTS=has_agents, BLOCK=TOKEN_BLOCK,
        )  # fmt: skip
    _below_counts_kernel[(programs, batch)](score, cell, threshold, below, n_tokens, HAS_AGENTS=has_agents, BLOCK=TOKEN_BLOCK)
    _slots_kernel[(programs, batch)](
        score, best, cell, threshold, below, slot, agent_slot, n_tokens, shape.num_dst,
        HAS_AGENTS=has_agents, BLOCK=TOKEN_BLOCK, MAX_PROGRAMS=next_power_of_2(programs),
    )  # fmt: skip
