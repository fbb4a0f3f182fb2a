"""The Triton kernels against merge.py's torch code (on CPU through Triton's interpreter)."""

import pytest
import torch

from agentsd import kernels, merge

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def torch_path():
    """Call merge.py's functions with the kernels off (they are off on the CPU anyway)."""
    enabled = kernels.ENABLED
    kernels.ENABLED = False
    yield
    kernels.ENABLED = enabled


def inputs(dtype, batch=2, grid=merge.Grid(2, 12, 20), stride=(2, 4), channels=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, grid.height * grid.width, channels, generator=g).to(DEVICE, dtype)
    return x, merge.choose_destinations(grid, *stride, seed=seed, timestep=500, device=DEVICE)


def kernel_plan(x, dst, num_merged=None, num_agent_merged=None, grid=merge.Grid(2, 12, 20), seed=0, timestep=500):
    """kernels.plan for x on `grid` (inputs()'s default), whose destinations `dst` inputs() drew with
    this seed and timestep; 40% merged by default."""
    num_merged = int(x.shape[1] * 0.4) if num_merged is None else num_merged
    where = dict(seed=seed, timestep=timestep) if torch.is_tensor(timestep) else dict(key=merge.random_key(seed, timestep))
    return kernels.plan(x, grid.width, *dst.cell, grid.downsample, num_merged, num_agent_merged, **where)


@pytest.fixture
def fresh_layouts():
    """Layouts made again (tests that patch what they depend on)."""
    kernels.layout.layout_for.cache_clear()
    yield
    kernels.layout.layout_for.cache_clear()


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("timestep", [981, torch.tensor(981), torch.tensor([20.5, 20.5])], ids=["int", "tensor", "float-batch"])
def test_destinations(torch_path, seed, timestep):
    """The prologue's destination pattern is merge.choose_destinations', whether its key comes from
    the host or is drawn from the timestep tensor, with tokens outside the complete cells."""
    timestep = timestep.to(DEVICE) if torch.is_tensor(timestep) else timestep
    for grid, sy, sx in ((merge.Grid(1, 12, 20), 2, 4), (merge.Grid(2, 7, 10), 4, 4), (merge.Grid(1, 5, 5), 2, 2)):
        expected = merge.choose_destinations(grid, sy, sx, seed, timestep, device=DEVICE)
        x = torch.randn(2, grid.height * grid.width, 16, device=DEVICE)
        if seed is not None and torch.is_tensor(timestep):  # the key drawn in the kernel from the tensor
            where = dict(seed=seed, timestep=timestep)
        else:
            where = dict(key=None if seed is None else merge.random_key(seed, timestep))
        parts = kernels.plan(x, grid.width, sy, sx, grid.downsample, 1, None, **where).parts()
        assert torch.equal(parts["dst_index"].long(), expected.index)
        assert torch.equal(parts["token_cell"] >= 0, expected.is_dst)
        assert torch.equal(parts["token_cell"].clamp(min=0).long(), expected.slot)


# 8 x 32 tokens in 2 x 4 cells: 32 destinations, two whole tiles of 16 (EVEN_D)
WHOLE_CELLS = merge.Grid(2, 8, 32), (2, 4)
# 13 x 26 tokens in the agent stage's 4 x 4 cells: 18 destinations, the second tile mostly past them
# (EVEN_D false), and tokens right of the cells (two columns) and below them
CELLS_AND_REST = merge.Grid(1, 13, 26), (4, 4)


@pytest.mark.parametrize(
    "dtype, channels, grid_cell, channels_last",
    # Every kernel with each dtype it runs in, each grid and each memory layout: channels-last as SD
    # 1.x block inputs come (stride(-1) = N), which the resident kernel reads in place and the looped
    # one copies. 48 = 32 + 16 and, in fp16, 272 = 128 + 128 + 16 stay in registers (the resident
    # kernel); 40 = 32 + 8 (a part under 16) and 272 in fp32 (too many registers) take the looped one.
    [
        (torch.float32, 48, WHOLE_CELLS, False),  # resident, IEEE products
        (torch.float16, 48, CELLS_AND_REST, True),  # resident
        (torch.float16, 272, WHOLE_CELLS, True),  # resident in three parts (the other grid: test_every_resident_config)
        (torch.float32, 272, CELLS_AND_REST, True),  # looped over five channel blocks, IEEE products
        (torch.float16, 40, WHOLE_CELLS, False),  # looped
    ],
    ids=["resident-fp32", "resident-fp16-rest-channels-last", "resident-3-parts-channels-last",
         "looped-fp32-rest-channels-last", "looped-fp16"],  # fmt: skip
)
def test_best_destination(torch_path, dtype, channels, grid_cell, channels_last):
    grid, cell = grid_cell
    x, dst = inputs(dtype, grid=grid, stride=cell, channels=channels)
    x = x * torch.linspace(0.1, 30, x.shape[1], device=DEVICE)[:, None].to(dtype)  # norms far from 1
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    score, best = merge.best_destination(x, dst)
    counts = merge.merge_counts(x.shape[1], dst.index.numel(), 0.4, 0.95)
    parts = kernel_plan(x, dst, *counts, grid=grid).parts()
    k_score, k_best = parts["score"], parts["best"].long()
    # the selection (in the resident matching's last programs, or a launch of its own) on these scores
    slot, agent_slot = merge.assign_slots(k_score, k_best, dst, *counts)
    assert torch.equal(parts["slot"].long(), slot) and torch.equal(parts["agent_slot"].long(), agent_slot)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(k_score, score.float(), rtol=tolerance, atol=tolerance)
    # the index agrees wherever the best destination wins by more than the rounding
    unit = x.float() / x.float().norm(dim=-1, keepdim=True)
    top2 = (unit @ unit[:, dst.index].transpose(1, 2)).topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 4 * tolerance
    assert clear.float().mean() > 0.7  # enough tokens to compare (similarities crowd more at 272 channels)
    assert torch.equal(k_best[clear], best[clear])
    assert torch.isinf(k_score[:, dst.index]).all()
    unit_dst = parts["dst_unit"].float()
    torch.testing.assert_close(unit_dst, unit[:, dst.index], rtol=tolerance, atol=tolerance)
    # the first launch of a shape autotunes; a later one launches the config found directly
    assert any(key[1:] == (x.shape[1], dst.index.numel(), channels, dtype) for key in kernels.matching._matching_configs_found)
    again = kernel_plan(x, dst, *counts, grid=grid).parts()
    assert torch.equal(again["score"], k_score) and torch.equal(again["best"], parts["best"])
    assert torch.equal(again["slot"], parts["slot"]) and not again["counters"].any()


@pytest.mark.parametrize("channels", [48, 272, 40], ids=["resident", "resident-3-parts", "looped"])
def test_best_destination_ties_go_to_the_lower_index(torch_path, channels):
    """Every destination the same vector: each source ties across all of them, in every tile and
    accumulator slot, and must take destination 0, as torch's max does."""
    grid, cell = CELLS_AND_REST
    x, dst = inputs(torch.float16, grid=grid, stride=cell, channels=channels)
    x[:, dst.index] = x[:, :1]
    score, best = merge.best_destination(x, dst)
    parts = kernel_plan(x, dst, grid=grid).parts()
    sources = ~dst.is_dst
    assert dst.index.numel() > 16  # more than one destination tile (16 wide in the interpreter)
    assert (best[:, sources] == 0).all()
    assert torch.equal(parts["best"][:, sources].long(), best[:, sources])
    torch.testing.assert_close(parts["score"], score.float(), rtol=2e-3, atol=2e-3)


# Every candidate of the resident kernel's autotuner, forced one at a time (in the interpreter a small
# tile with the rows in registers and one with them in shared memory)
if kernels.triton is None:
    RESIDENT_CONFIGS = []
elif kernels.INTERPRET:
    RESIDENT_CONFIGS = [kernels.triton.Config({"BLOCK_M": 16, "BLOCK_D": 16, "SHARED_ROWS": shared}) for shared in (False, True)]
else:
    RESIDENT_CONFIGS = kernels.matching_kernels._best_destination_resident_kernel.configs


@pytest.mark.parametrize("config", RESIDENT_CONFIGS, ids=str)
def test_every_resident_config(torch_path, monkeypatch, config):
    """Scores and indices as the reference's, and ties to the lower index, whichever candidate the
    autotuner picks on a GPU."""
    grid, cell = CELLS_AND_REST
    x, dst = inputs(torch.float16, grid=grid, stride=cell, channels=272)  # 128 + 128 + 16
    x = (x * torch.linspace(0.1, 30, x.shape[1], device=DEVICE)[:, None].half()).transpose(1, 2).contiguous().transpose(1, 2)
    tied = x.clone()
    tied[:, dst.index] = tied[:, :1]  # every source ties across all destinations
    key = (kernels.matching_kernels._best_destination_resident_kernel, x.shape[1], dst.index.numel(), 272, torch.float16)
    monkeypatch.setitem(kernels.matching._matching_configs_found, key, config)
    for metric in (x, tied):
        score, best = merge.best_destination(metric, dst)
        parts = kernel_plan(metric, dst, grid=grid).parts()
        k_score, k_best = parts["score"], parts["best"].long()
        torch.testing.assert_close(k_score, score.float(), rtol=2e-3, atol=2e-3)
        unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)
        top2 = (unit @ unit[:, dst.index].transpose(1, 2)).topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 8e-3
        assert torch.equal(k_best[clear], best[clear])
    sources = ~dst.is_dst
    assert (k_best[:, sources] == 0).all()  # the tied input's


@pytest.mark.parametrize("tied", [False, True])
def test_looped_matching_split_over_destinations(torch_path, monkeypatch, fresh_layouts, tied):
    """With the destinations split across programs (few rows, e.g. SDXL 1024px) the results are the
    unsplit kernel's, ties to the lower index included."""
    # 40 channels: the looped kernel; two splits of whole tiles (16 in the interpreter, up to 256 on a GPU)
    grid, cell = WHOLE_CELLS if kernels.INTERPRET else (merge.Grid(1, 64, 64), (2, 2))
    x, dst = inputs(torch.float16, grid=grid, stride=cell, channels=40)
    if tied:
        x[:, dst.index] = x[:, :1]
    monkeypatch.setattr(kernels.layout, "_destination_splits", lambda *args: 1)
    whole = kernel_plan(x, dst, grid=grid).parts()
    kernels.layout.layout_for.cache_clear()
    monkeypatch.setattr(kernels.layout, "_destination_splits", lambda *args: 2)  # 32 destinations: 16 + 16; 1024: 512 + 512
    split = kernel_plan(x, dst, grid=grid).parts()
    # each split's programs matched against their half of the destinations, and a launch combined the parts
    sources, half = ~dst.is_dst, dst.index.numel() // 2
    part_score, part_best = split["part_score"][:, :, sources], split["part_best"][:, :, sources]
    assert (part_best[0] < half).all() and (part_best[1] >= half).all()
    assert torch.equal(part_score.amax(0), split["score"][:, sources])
    assert torch.equal(split["score"], whole["score"]) and torch.equal(split["best"], whole["best"])
    assert torch.equal(split["slot"], whole["slot"])
    if tied:
        assert (split["best"][:, ~dst.is_dst] == 0).all()


# t and t_a: with agents or not; 210: every source; 1: the top score alone
@pytest.mark.parametrize("merged, agents", [(90, None), (90, 200), (210, None), (90, 210), (1, 1)])
@pytest.mark.parametrize("ties", [False, True])
# 240 tokens: one program per batch row, or four radix programs per row (64 tokens each, the last
# one partly past them)
@pytest.mark.parametrize("one_program", [True, False], ids=["one-program", "radix-launches"])
def test_assign_slots(torch_path, monkeypatch, fresh_layouts, merged, agents, ties, one_program):
    """The selection kernels on given scores, written into a workspace as the prologue and the
    matching leave it, against merge.assign_slots."""
    monkeypatch.setattr(kernels.layout, "ONE_PROGRAM_MAX_TOKENS", 10**9 if one_program else 0)
    x, dst = inputs(torch.float32)
    shape = kernels.PlanShape(*x.shape, x.dtype, dst.width, *dst.cell, merged, agents)
    layout = kernels.layout.layout_for(shape, x.device)
    parts = kernels.layout.views(torch.zeros(layout.size, dtype=torch.uint8, device=DEVICE), layout)  # counters zero
    score, best = merge.best_destination(x, dst)
    if ties:  # a few distinct values: ranks among equal scores follow the token index
        score = torch.where(torch.isinf(score), score, (score * 4).round() / 4 - 1)
        assert score[0].unique().numel() < 10
    assert dst.index.numel() == 30
    assert (parts["counters"].shape[1] > 1) != one_program  # the radix passes' histograms
    parts["token_cell"].copy_(torch.where(dst.is_dst, dst.slot, -1))
    parts["score"].copy_(score)
    parts["best"].copy_(best)
    kernels.selection.select(parts, shape, layout)
    expected = merge.assign_slots(score, best, dst, merged, agents)
    assert torch.equal(parts["slot"].long(), expected[0])
    assert ("agent_slot" in parts) == (agents is not None)
    assert agents is None or torch.equal(parts["agent_slot"].long(), expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("agents", [False, True])
def test_merge_and_unmerge(torch_path, dtype, agents):
    """The kernels' merge against merge.py's on the kernels' own plan, again after a first merge
    (the sums it leaves clean serve a second one, as with merge_crossattn), and the unmerge."""
    x, dst = inputs(dtype)
    x = x * 50  # residual-stream magnitudes
    plan = kernel_plan(x, dst, 100, 200 if agents else None)
    parts = plan.parts()
    agent_slot = parts["agent_slot"].long() if agents else None
    reference = merge.MergePlan(parts["slot"].long(), 100, agent_slot, 200 if agents else None, dst)
    expected = merge.merge_with_agents(x.float(), reference) if agents else (merge.merge(x.float(), reference), None)
    tolerance = dict(rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-5)
    for with_agents in (agents, False):
        got = kernels.merge(x, plan, with_agents)
        assert (got[1] is None) == (not with_agents)
        assert got[0].dtype == dtype and got[0].shape == (2, x.shape[1] - 100, x.shape[2])
        torch.testing.assert_close(got[0].float(), expected[0], **tolerance)
        if with_agents:
            torch.testing.assert_close(got[1].float(), expected[1], **tolerance)
    assert not parts["sums"].any()
    y = torch.randn(2, plan.num_slots, 24, device=DEVICE, dtype=dtype)
    assert torch.equal(kernels.unmerge(y, plan), merge.unmerge(y, reference))
    assert torch.equal(kernels.unmerge(y[:, :, ::2], plan), merge.unmerge(y[:, :, ::2], reference))  # strided input
    # with the block's residual added as it unmerges (channels-last, as SD 1.x block inputs): torch's sum
    residual = (torch.randn(2, 24, x.shape[1], device=DEVICE) * 30).to(dtype).transpose(1, 2)
    fused = kernels.unmerge(y, plan, residual)
    assert fused.is_contiguous() and torch.equal(fused, merge.unmerge(y, reference) + residual)
    assert torch.equal(merge.unmerge(y, reference, residual), merge.unmerge(y, reference) + residual)


def test_launchers_run_on_the_device_of_their_tensors(monkeypatch):
    """Triton launches on the current device: a launcher whose tensors live on another GPU makes
    theirs current for the launch (and puts the current one back)."""
    current = [0]

    class DeviceGuard:  # torch.cuda.device
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: current[0], raising=False)
    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    seen = []
    probe = lambda x, n=0: seen.append((current[0], x, n)) or "out"  # noqa: E731
    assert kernels.launch.run_on(1, probe, ("x",), dict(n=3)) == "out"
    assert seen == [(1, "x", 3)] and current == [0]
    kernels.launch.run_on(0, probe, ("y",), {})
    kernels.launch.run_on(-1, probe, ("z",), {})
    assert seen[1:] == [(0, "y", 0), (0, "z", 0)]
    assert kernels.launch.device_index(torch.zeros(1)) == -1  # the CPU
    assert kernels.launch.device_index(torch.device("cuda", 1)) == 1
    assert kernels.launch.device_index("cuda") == -1  # the current device
    assert kernels.launch.device_index(torch.device("cpu")) == -1


def test_resident_rows_only_where_they_fit(monkeypatch):
    """The resident kernel needs a program's rows in registers and two stages of destination tiles
    in shared memory."""
    monkeypatch.setattr(kernels.layout, "INTERPRET", False)
    monkeypatch.setattr(kernels.layout, "_shared_memory", lambda device: 227 * 1024)  # H100
    split = lambda channels, dtype=torch.float16: kernels.layout._resident_split(channels, dtype, "cuda")  # noqa: E731
    assert split(320) == (128, 128, 64)
    assert split(192) == (128, 0, 64)
    assert split(320, torch.float32) is None  # twice the registers
    assert split(40) is None  # 32 + 8: a tile under 16
    monkeypatch.setattr(kernels.layout, "_shared_memory", lambda device: 99 * 1024)  # consumer GPUs
    assert split(320) == (128, 128, 64)
    monkeypatch.setattr(kernels.layout, "_shared_memory", lambda device: 64 * 1024)
    assert split(320) is None


@pytest.mark.parametrize("agents", [False, True])
def test_custom_ops_agree_with_their_fakes(torch_path, agents):
    """The ops that torch.compile records: schema, fake shapes and dtypes against the real results
    (a plan's workspace leaves the padding between its parts unwritten: no comparison of values)."""
    grid = merge.Grid(1, 8, 8)  # small: the ops' schemas and shapes are under test here, not the kernels' branches
    x, dst = inputs(torch.float16, grid=grid, stride=(2, 2), channels=16)
    ops = torch.ops.agentsd
    num_agent_merged = 40 if agents else None
    plan_args = (x, dst.width, *dst.cell, 2, None, 5, torch.tensor(981.0, device=DEVICE), 20, num_agent_merged)
    torch.library.opcheck(ops.plan, plan_args, test_utils=("test_schema", "test_faketensor"))
    plan = kernel_plan(x, dst, 20, num_agent_merged, grid=grid)
    shape = plan.shape[1:]
    torch.library.opcheck(ops.merge, (x, plan.workspace, *shape, agents))
    y = torch.randn(2, plan.num_slots, 24, device=DEVICE, dtype=torch.float16)
    torch.library.opcheck(ops.unmerge, (y, plan.workspace, None, *shape))
    torch.library.opcheck(ops.unmerge, (y, plan.workspace, torch.randn(2, x.shape[1], 24, device=DEVICE).half(), *shape))
