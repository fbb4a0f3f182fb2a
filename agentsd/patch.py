"""apply_patch / remove_patch: the only module that touches diffusers objects.

What a patch installs on the UNet, all of it undone by remove_patch (nothing on the pipeline or its
scheduler; parameters and the state_dict are untouched):
- a forward pre-hook and hook on the UNet: latent size, stage and timestep of the call;
- a forward on every BasicTransformerBlock that block.py's lean_forward can run, and on every block
  of the merged levels: there the block's merge plan, from the block input X, given up after its
  last use; then lean_forward where it computes what diffusers' forward does, else the forward it
  replaced (which may be a hook's wrapper);
- AgentSDAttnProcessor around each merged block's attn1 processor, and on that attn1 a
  `set_processor` and `get_processor` that keep it around whatever processor diffusers or the user
  sets later;
- with merge_crossattn / merge_mlp, merge and unmerge hooks around attn2 / ff.

What one call needs (its stage, latent size, seed, timestep, each block's plan) is kept per thread,
so that threads may share a patched UNet wherever diffusers lets them.
"""

import threading
import warnings

import torch
from diffusers import DiffusionPipeline, ModularPipeline, UNet2DConditionModel
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook, FeedForwardSkipHook
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook
from diffusers.models.attention import BasicTransformerBlock

from . import schedule
from .attention import (POSITION_FREE_CROSS_ATTENTION, AgentSDAttnProcessor, is_plain, plain_attention,
                        register_with_diffusers_hooks)  # fmt: skip
from .block import is_lean, lean_forward, runs_lean, wrapped
from .config import K_SCALE2, K_SHORTCUT, RATIO, SEED, AgentSDConfig, build_config
from .merge import Grid, merge, merge_counts, plan_block, token_grid, unmerge
from .schedule import StagedPlan, stage_at, trajectory_fraction

# The hooks of diffusers' guiders (perturbed-attention, skip-layer, smoothed-energy) in the blocks they
# perturb, for their extra calls: they read the self-attention's queries as an image (SEG's blur) or
# replace its softmax or output, so those blocks run unmerged then, as the guider computes them unpatched.
GUIDANCE_HOOKS = (AttentionProcessorSkipHook, FeedForwardSkipHook, SmoothedEnergyGuidanceHook)

SUPPORTED = (
    "a diffusers pipeline with a UNet2DConditionModel `.unet` (Stable Diffusion 1.x/2.x, SDXL, their "
    "img2img/inpaint and ControlNet variants, also as modular pipelines) or a UNet2DConditionModel"
)


def apply_patch(
    model,
    ratio: float = RATIO,
    *,
    sx: int | None = None,
    sy: int | None = None,
    agent_ratio: float | None = None,
    schedule=None,
    max_downsample: int | None = None,
    k_scale2: float = K_SCALE2,
    k_shortcut: float = K_SHORTCUT,
    attn_precision: str | None = None,
    use_rand: bool = True,
    seed: int = SEED,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    min_tokens: int | None = None,
    scheduler=None,
):
    """Patch `model` with AgentSD in place and return it; remove_patch undoes it exactly.

    Without sx/sy/agent_ratio/schedule the paper's schedule applies: agent attention (sx=sy=4,
    agent_ratio=0.95) for the first 40% of the denoising trajectory, plain ToMe (sx=sy=2,
    agent_ratio=0.5) after, both at `ratio`. Re-applying replaces the previous patch; invalid
    arguments raise TypeError/ValueError naming the parameter before anything changes.

    Args:
        model: a diffusers pipeline (also modular) whose `.unet` is a UNet2DConditionModel (SD 1.x/2.x,
            SDXL, their img2img, inpaint and ControlNet pipelines), or such a UNet, also a torch.compile'd one.
        ratio: fraction of a block's tokens merged away, in [0, 1); 0 leaves the model's outputs
            unchanged, bit for bit.
        sx, sy: one destination token per sy x sx cell of the token grid (positive ints); give them
            with agent_ratio for one fixed setting at every step.
        agent_ratio: fraction merged away to form the agent tokens, in [0, 1); agents are used only
            where they pay (2n < N - t), so 0 gives plain ToMe.
        schedule: stages instead of one setting: a list of agentsd.Stage(end, sx, sy, agent_ratio,
            ratio=None) or of dicts with those keys, `end` rising to 1.0 (a fraction of the trajectory).
        max_downsample: merge in the levels downsampled at most this much (1, 2, 4 or 8); None: the top
            level that has transformer blocks (1 for SD 1.x/2.x, 2 for SDXL).
        k_scale2: in [0, 1]; the agents broadcast with the softmax scale (d ** -0.5) ** k_scale2.
        k_shortcut: in [0, 1]; weight of the V shortcut added to the agent attention output.
        attn_precision: None, or "fp32" to compute the similarities of patched blocks in float32
            (SD 2.1 overflows in float16 without it).
        use_rand: a random destination in each cell, drawn anew at each timestep (top-left when False,
            and with an odd batch, whose CFG halves could not share one pattern).
        seed: of the random destinations (an int); the default is the same in every process, and
            nothing is drawn from torch's generator, so images follow the pipeline's generator alone.
        merge_attn: merge tokens for the self-attention (where agents act).
        merge_crossattn: also merge for the cross-attention (plain ToMe there), where nothing reads
            its tokens by place: not in calls with IP-Adapter masks, nor under a processor other than
            diffusers' own (Attend-and-Excite's, say; with a warning).
        merge_mlp: also merge for the feed-forward, unless it is chunked (set_chunk_feed_forward).
        min_tokens: merge only in blocks that see at least this many tokens; None: 8192 (SD 1.x/2.x
            from 768px, SDXL's second level from about 1448px). At 4096 tokens even a free merge plan
            gains at most 1.04x on a GPU with fused attention, less than the plan's launches cost in
            an eager call; 0 merges wherever the paper does (as at 512px, its FID protocol).
        scheduler: only for loops that hand the UNet timesteps of their own rather than elements of
            `scheduler.timesteps` (diffusers' pipelines never do): agentsd looks them up in this
            scheduler's timesteps to find the stage.
    """
    config = build_config(
        ratio=ratio, sx=sx, sy=sy, agent_ratio=agent_ratio, schedule=schedule, max_downsample=max_downsample,
        k_scale2=k_scale2, k_shortcut=k_shortcut, attn_precision=attn_precision, use_rand=use_rand,
        seed=seed, merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, min_tokens=min_tokens,
    )  # fmt: skip
    unet = find_unet(model)
    blocks = transformer_blocks(unet)
    if not blocks:
        kinds = ", ".join(dict.fromkeys(unet.config.down_block_types))  # e.g. the x2 latent upscaler's K blocks
        raise ValueError(f"{type(unet).__name__} has no transformer blocks (BasicTransformerBlock) to patch; its down blocks: {kinds}")
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise TypeError(f"scheduler must be a diffusers scheduler (with .timesteps), got {type(scheduler).__name__}")
    remove_patch(unet)
    UNetPatch(unet, blocks, config, scheduler)
    return model


def remove_patch(model):
    """Undo apply_patch. Harmless on a model that is not patched (also a pipeline or module agentsd
    cannot patch); returns `model`."""
    unet = _patchable_or_none(model)
    patch = unet.__dict__.pop("_agentsd", None) if unet is not None else None
    if patch is not None:
        patch.remove()
    return model


def is_patched(model) -> bool:
    unet = _patchable_or_none(model)
    return unet is not None and "_agentsd" in unet.__dict__


def _patchable_or_none(model) -> UNet2DConditionModel | None:
    """find_unet's UNet, or None for a pipeline or module without one; TypeError for anything else."""
    try:
        return find_unet(model)
    except TypeError:
        if isinstance(model, (DiffusionPipeline, ModularPipeline, torch.nn.Module)):
            return None
        raise


def find_unet(model) -> UNet2DConditionModel:
    """The UNet of a pipeline or the UNet itself; TypeError for anything else."""
    pipe = None
    if isinstance(model, (DiffusionPipeline, ModularPipeline)):  # a modular one is no DiffusionPipeline
        pipe, model = model, getattr(model, "unet", None)
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if isinstance(model, UNet2DConditionModel):
        return model
    if pipe is not None:
        found = ", ".join(f"{k}={type(v).__name__}" for k, v in pipe.components.items() if isinstance(v, torch.nn.Module))
        unet = "no .unet" if model is None else f".unet {type(model).__name__}"
        if isinstance(pipe, ModularPipeline) and model is None:
            unet += " (a modular pipeline loads it with load_components() or update_components(unet=...))"
        raise TypeError(f"agentsd supports {SUPPORTED}; {type(pipe).__name__} has {unet}, models: {found or 'none'}")
    raise TypeError(f"agentsd supports {SUPPORTED}; got {type(model).__name__}")


def transformer_blocks(unet: UNet2DConditionModel) -> list[tuple[int, BasicTransformerBlock]]:
    """(downsampling factor of its level, block) for every BasicTransformerBlock of the UNet.

    Every down block but the last halves the resolution (UNet2DConditionModel's layout).
    """
    last = len(unet.down_blocks) - 1
    parts = [(2**i, part) for i, part in enumerate(unet.down_blocks)] + [(2**last, unet.mid_block)]
    parts += [(2 ** (last - i), part) for i, part in enumerate(unet.up_blocks)]
    return [
        (level, m) for level, part in parts if part is not None for m in part.modules() if isinstance(m, BasicTransformerBlock)
    ]


class PerThread(threading.local):
    """Attributes that each thread sets and reads for itself, all None in a new thread (set in
    __init__, which threading.local runs once per thread: torch 2.11's dynamo reads class attributes
    instead of a thread's own). A copy or an unpickled patch starts with none set."""

    names = ()

    def __init__(self):
        for name in self.names:
            setattr(self, name, None)

    def __reduce__(self):
        return type(self), ()


class CallState(PerThread):
    """The UNet call running in this thread, as before_unet found it: the index of its stage in
    config.stages (an int: torch 2.11's dynamo cannot guard a Stage read from here) and the same as
    one CPU bool tensor per stage (`stage_flags`, read by compiled calls, see StagedPlan), its input
    latent (a tensor, not its size: under torch.compile's dynamic shapes its sizes are the graph's
    symbols, so one graph serves every size), seed of the destinations (None: top-left) and timestep."""

    names = ("stage_index", "stage_flags", "latent", "seed", "timestep")


class PlanSlot(PerThread):
    """A block's merge plan for the call running in this thread, until its last use."""

    names = ("plan", "merged")  # merged: the module (attn2 or ff) whose input merge_input merged


class UNetPatch:
    """Everything one patched UNet holds, and the hooks that run on each call."""

    def __init__(self, unet: UNet2DConditionModel, blocks, config: AgentSDConfig, scheduler=None):
        self.config = config
        self.scheduler = scheduler  # where to look up timesteps that are not elements of a timesteps list
        # By default only the highest-resolution level with transformer blocks (1 for SD, 2 for SDXL).
        self.max_downsample = config.max_downsample or min(level for level, _ in blocks)
        self.call = CallState()
        # CallState.stage_flags of each stage: made once, so that eager calls pay nothing for them
        stages = range(len(config.stages))
        self.stage_flags = [tuple(torch.tensor(i == j) for j in stages) for i in stages]
        register_with_diffusers_hooks()  # so that guiders can skip attention over its processor
        self.warned_checkpointing = False
        self.handles = [
            unet.register_forward_pre_hook(self.before_unet, with_kwargs=True),
            unet.register_forward_hook(self.after_unet, always_call=True),  # also when the call raises
        ]
        self.blocks = []
        for level, block in blocks:
            users = (block.attn1, config.merge_attn), (block.attn2, config.merge_crossattn), (block.ff, config.merge_mlp)
            # Only the merged levels (by default the top one) plan and merge; every block that lean_forward
            # can run gets it, so that eager calls spend less host time in diffusers' generality.
            users = [m for m, wanted in users if wanted and m is not None and level <= self.max_downsample]
            if users or is_lean(block):
                self.blocks.append(PatchedBlock(self, block, users))
        unet._agentsd = self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for patched_block in self.blocks:
            patched_block.remove()

    # Eager even inside a compiled UNet: it reads the timestep's place in its list from tensor metadata,
    # and the compiled blocks read only the stage it sets (as data through stage_flags, see StagedPlan).
    @torch.compiler.disable
    def before_unet(self, unet, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        call = self.call
        if torch.is_grad_enabled() and unet.is_gradient_checkpointing:
            # The backward pass runs the blocks again, after this call: they must compute what they did,
            # so they run unmerged both times (a block outside a UNet call runs unmerged).
            call.latent = None
            if not self.warned_checkpointing:
                self.warned_checkpointing = True
                warnings.warn("agentsd: gradient checkpointing is on, so agentsd does not merge tokens in calls "
                              "that record gradients.", stacklevel=2)  # fmt: skip
            return
        call.latent = sample
        stages = self.config.stages
        # At ratio 0 or below min_tokens no block merges and the stage is moot: not looked up (a timestep
        # of a custom loop's own is placed by value, with a warning and a device read)
        merges = any(stage.ratio for stage in stages) and sample.shape[-2] * sample.shape[-1] >= self.config.min_tokens
        moot = len(stages) == 1 or not merges
        call.stage_index = 0 if moot else stages.index(stage_at(stages, trajectory_fraction(timestep, self.scheduler)))
        call.stage_flags = self.stage_flags[call.stage_index]
        if not moot and schedule.ONE_GRAPH_FOR_STAGES:
            schedule.keep_cond_graphs_in_caches()  # before a compiled UNet's first graph is compiled
        # An odd batch cannot hold both CFG halves, which must share one pattern (as in ToMeSD).
        use_rand = self.config.use_rand and sample.shape[0] % 2 == 0
        call.seed = self.config.seed if use_rand else None
        call.timestep = timestep.to(sample.device) if torch.is_tensor(timestep) else timestep

    def after_unet(self, unet, args, output) -> None:
        # a block called on its own after this call runs unpatched, as before the first call
        self.call.latent = self.call.timestep = None

    def plan_for(self, x: torch.Tensor, staged: bool = False):
        """The merge plan of a block whose input is x (B, N, C), or None to run it unpatched; a
        StagedPlan where `staged` (the plan's one user can take one), torch.compile traces a schedule
        of several stages and ONE_GRAPH_FOR_STAGES."""
        call = self.call
        # stage_index is read last, only where a block merges: under torch.compile reading it makes a
        # graph per stage, which a run that merges nothing (min_tokens, say at 512px) does not need
        if call.latent is None:  # a block called outside a UNet call
            return None
        num_tokens = x.shape[1]
        if num_tokens == 0 or num_tokens < self.config.min_tokens:  # token_grid needs a token (min_tokens may be 0)
            return None
        grid = token_grid(call.latent.shape[-2:], num_tokens)
        if grid.downsample > self.max_downsample or grid.height * grid.width != num_tokens:
            return None
        stages = self.config.stages
        if staged and len(stages) > 1 and schedule.ONE_GRAPH_FOR_STAGES and torch.compiler.is_compiling():
            merges = any(_merge_counts(num_tokens, grid, s)[0] for s in stages)
            return StagedPlan(x.contiguous(), grid) if merges else None
        return self.stage_plan(x, grid, stages[call.stage_index])

    def stage_plan(self, x: torch.Tensor, grid: Grid, stage):
        """The merge plan of `stage` for a block whose input x lies on `grid`, or None where it merges
        nothing. Inside torch.cond's branches too: it only reads what a trace may (sizes, the seed)."""
        num_merged, num_agent_merged = _merge_counts(x.shape[1], grid, stage)
        if num_merged == 0:
            return None
        # One destination pattern per level and call (a level's blocks draw the same one): drawn
        # again in every block, it lives only as long as the block's plan.
        return plan_block(x, grid, stage.sy, stage.sx, num_merged, num_agent_merged, self.call.seed, self.call.timestep)

    def over_stages(self, plan: StagedPlan, merged, unmerged, h: torch.Tensor | None = None, norm=None) -> torch.Tensor:
        """The self-attention of a block in this call's stage: merged(stage's plan, h), or unmerged(h)
        in a stage that merges nothing in this block (h: attn1's input; x = plan.x, the block input),
        as a torch.cond on each stage's CPU flag in turn. Both branches are traced, the rest of the UNet
        once; the flag costs no device sync (but inductor keeps no CUDA graphs for a graph holding a
        cond: see ONE_GRAPH_FOR_STAGES). With `norm`, each branch computes h = norm(x) itself and `h`
        is not needed."""
        stages, flags = self.config.stages, self.call.stage_flags
        channels = plan.x.shape[-1]

        def in_stage(i):
            def run(*flat):
                x, *given = (t.unflatten(1, (-1, channels)) for t in flat)
                h = norm(x) if norm is not None else given[0]
                stage_plan = self.stage_plan(x, plan.grid, stages[i])
                return unmerged(h) if stage_plan is None else merged(stage_plan, h)

            if i == len(stages) - 1:
                return run
            later = in_stage(i + 1)
            return lambda *operands: torch.cond(flags[i], run, later, operands)

        # Operands, not closures, contiguous (StagedPlan.x is) and flattened to (B, N * C): inductor does not
        # lay a cond's operands out as its branches were traced (torch 2.11-2.13), and a copy made contiguous
        # can keep its source's strides, as a block input from SD 1.5's proj_in (a convolution) has under
        # compile_repeated_blocks; a view that merges N and C fixes the copy contiguous. An operand whose last
        # use is the cond stays allocated to the end of the compiled UNet whenever the false branch runs
        # (inductor 2.11-2.13 frees the operands in the true branch only; +0.175 GiB at SD 1.5 1024 on an H100):
        # x lives on as the block's residual, and h, where the caller gives `norm`, is no operand.
        operands = (plan.x,) if norm is not None else (plan.x, h.contiguous())
        return in_stage(0)(*(t.flatten(1) for t in operands))


def _merge_counts(num_tokens: int, grid: Grid, stage) -> tuple[int, int | None]:
    num_dst = (grid.height // stage.sy) * (grid.width // stage.sx)
    return merge_counts(num_tokens, num_dst, stage.ratio, stage.agent_ratio)


def _has_weights(processor) -> bool:
    """Parameters or buffers: Custom Diffusion's attn1 processors are modules without either."""
    if not isinstance(processor, torch.nn.Module):
        return False
    return any(True for _ in processor.parameters()) or any(True for _ in processor.buffers())


class PatchedBlock:
    """One transformer block under the patch: its forward, and for the modules that merge (`users`,
    none in blocks of deeper levels) the merge plan of the current call and its hooks."""

    def __init__(self, patch: UNetPatch, block, users):
        self.patch = patch
        self.block = block
        self.users = users
        self.last_user = users[-1] if users else None  # the plan is given up after it, before the feed-forward where memory peaks
        self.staged = users == [block.attn1]  # its one user can take a StagedPlan (see UNetPatch.plan_for)
        self.slot = PlanSlot()
        self.lean = is_lean(block)
        self.removed = False
        self.warned = self.warned_attn2 = self.warned_guided = False
        self.handles = []
        for module in users:
            if module is not block.attn1:
                self.handles.append(module.register_forward_pre_hook(self.merge_input, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self.unmerge_output, with_kwargs=True))
        self.merges_attn1 = block.attn1 in users
        attn = block.attn1
        # What was on the instances before (a forward that a hook put there, say): called beneath the
        # patch, and restored by remove.
        self.forward_beneath = block.__dict__.get("forward")
        # The class's forward as a plain function: torch 2.13's dynamo cannot trace
        # type(block).forward(block, ...) (it raises under fullgraph), but inlines a function.
        self.class_forward = type(block).forward
        self.set_processor_beneath = attn.__dict__.get("set_processor")
        self.guidance_sites = tuple(m for m in (attn, attn.to_q, attn.to_k, attn.to_v, block.ff) if m is not None)
        self.replaced = [(block, "forward", self.forward_beneath)]
        if self.merges_attn1:
            self.replaced += [(attn, "set_processor", self.set_processor_beneath), (attn, "get_processor", attn.__dict__.get("get_processor"))]
            processor = attn.processor
            attn.set_processor = self.set_processor
            attn.get_processor = self.get_processor
            self.set_processor(processor)
        block.forward = self.forward

    def remove(self) -> None:
        """Take back what __init__ installed and leave what others installed since."""
        for handle in self.handles:
            handle.remove()
        processor = self.own_processor() if self.merges_attn1 else None
        if processor is not None:
            self._set_beneath(processor.processor)
        for module, name, before in self.replaced:
            if not _bound_to(module.__dict__.get(name), self):
                continue  # wrapped again since: a pass-through now (self.removed)
            if before is None:
                delattr(module, name)
            else:
                setattr(module, name, before)
        self.removed = True

    def own_processor(self) -> AgentSDAttnProcessor | None:
        processor = self.block.attn1.processor
        return processor if type(processor) is AgentSDAttnProcessor and processor.patched_block is self else None

    def set_processor(self, processor) -> None:
        """attn1.set_processor while patched: the processor goes beneath agentsd, which stays on."""
        attn = self.block.attn1
        if isinstance(processor, AgentSDAttnProcessor):
            processor = processor.processor
        if _has_weights(processor):  # they must stay registered on attn1 (a weightless module can go beneath)
            self.warned = True  # about it, here
            warnings.warn(
                f"agentsd: {type(processor).__name__} has weights of its own, so it is set on attn1 as it is "
                "and agentsd does not merge tokens in that self-attention.",
                stacklevel=2,
            )
        elif not self.removed:
            processor = AgentSDAttnProcessor(self, attn, processor)
        self._set_beneath(processor)

    def _set_beneath(self, processor) -> None:
        """attn1.set_processor as it was before the patch."""
        attn = self.block.attn1
        if self.set_processor_beneath is not None:
            self.set_processor_beneath(processor)
        else:
            type(attn).set_processor(attn, processor)

    def get_processor(self, return_deprecated_lora: bool = False):
        """attn1.get_processor while patched (so unet.attn_processors): the processor beneath agentsd."""
        processor = self.block.attn1.processor
        return processor.processor if isinstance(processor, AgentSDAttnProcessor) else processor

    def plan_of(self, module):
        """The plan, given up here if `module` is its last user in the block."""
        slot = self.slot
        plan = slot.plan
        if module is self.last_user:
            slot.plan = None
        return plan

    def forward(self, hidden_states, *args, **kwargs):
        """The block's forward under the patch: the plan, then lean_forward where it applies, else the
        forward it replaced."""
        if self.removed:
            return self.forward_replaced(hidden_states, *args, **kwargs)
        if self.users:
            plan = self.patch.plan_for(hidden_states, staged=self.staged)
            self.slot.plan = None if plan is not None and self.guided() else plan
            if isinstance(self.slot.plan, StagedPlan):
                hidden_states = plan.x  # contiguous: the block's residual is the cond's operand (see over_stages)
        processor = self.own_processor() if self.merges_attn1 else None
        if self.merges_attn1 and processor is None and not self.warned:
            self.warned = True
            warnings.warn(
                "agentsd: a processor was assigned to attn1 directly (attn.processor = ..., as diffusers' PAG does "
                "in its layers), so agentsd does not merge in that self-attention while it is there; "
                "set_processor / set_attn_processor keep agentsd on over a processor.",
                stacklevel=2,
            )
        attn1_plain = processor.plain if processor is not None else not self.merges_attn1 and is_plain(self.block.attn1, self.block.attn1.processor)
        if self.lean and attn1_plain and self.forward_beneath is None and runs_lean(self.block, hidden_states, args, kwargs):
            return lean_forward(self.block, hidden_states, kwargs["encoder_hidden_states"], self.self_attention)
        return self.forward_replaced(hidden_states, *args, **kwargs)

    def guided(self) -> bool:
        """Whether a guider's hook (GUIDANCE_HOOKS) is on this block's self-attention or feed-forward
        in this call; warns once."""
        for module in self.guidance_sites:  # a loop: torch 2.11's dynamo breaks the graph on a walrus in a generator
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and any(isinstance(hook, GUIDANCE_HOOKS) for hook in registry.hooks.values()):
                if not self.warned_guided:
                    self.warned_guided = True
                    warnings.warn(
                        "agentsd: a guider's hook (perturbed-attention, skip-layer or smoothed-energy guidance) "
                        "perturbs this block, so agentsd does not merge in it during the guider's calls.",
                        stacklevel=2,
                    )
                return True
        return False

    def forward_replaced(self, *args, **kwargs):
        """The block's forward as it was before the patch."""
        if self.forward_beneath is not None:
            return self.forward_beneath(*args, **kwargs)
        return self.class_forward(self.block, *args, **kwargs)

    def self_attention(self, h, residual):
        """block.attn1(h) + residual in lean_forward."""
        attn = self.block.attn1
        plan = self.plan_of(attn) if self.merges_attn1 else None
        if plan is None:
            return plain_attention(attn, h, h) + residual
        if isinstance(plan, StagedPlan):  # the residual added after the cond, so that it outlives it
            merged = attn.processor.merged_attention
            unmerged = lambda h: plain_attention(attn, h, h)
            out = self.patch.over_stages(plan, lambda p, h: merged(attn, h, None, p), unmerged, norm=self.block.norm1)
            return out + residual
        return attn.processor.merged_attention(attn, h, None, plan, residual)

    def attn1_norm(self):
        """block.norm1 where attn1's input in this forward is norm1(block input), as in diffusers'
        BasicTransformerBlock with a plain layer norm, else None (see UNetPatch.over_stages)."""
        block = self.block
        diffusers_forward = self.forward_beneath is None and self.class_forward is BasicTransformerBlock.forward
        plain_norm = block.norm_type == "layer_norm" and block.pos_embed is None
        return block.norm1 if diffusers_forward and plain_norm and not wrapped(block.attn1) else None

    def merge_input(self, module, args, kwargs):
        """attn2's or ff's input merged (merge_crossattn, merge_mlp) where nothing reads its tokens by place."""
        plan = self.slot.plan
        merges = plan is not None and args and args[0].shape[1] == plan.num_tokens and self.may_merge(module, kwargs)
        self.slot.merged = module if merges else None  # what unmerge_output then unmerges
        return ((merge(args[0], plan), *args[1:]), kwargs) if merges else None

    def unmerge_output(self, module, args, kwargs, output):
        plan = self.plan_of(module)
        if self.slot.merged is not module:
            return None
        self.slot.merged = None
        return unmerge(output, plan)

    def may_merge(self, module, kwargs) -> bool:
        if module is self.block.ff:  # chunked (set_chunk_feed_forward): diffusers calls ff once per chunk
            return self.block._chunk_size is None
        if kwargs.get("ip_adapter_masks") is not None:
            return False
        if type(module.processor) in POSITION_FREE_CROSS_ATTENTION:
            return True
        if not self.warned_attn2:
            self.warned_attn2 = True
            warnings.warn(
                f"agentsd: {type(module.processor).__name__} on attn2 is not one of diffusers' attention processors, "
                "which read no token positions, so agentsd does not merge tokens for that cross-attention "
                "(merge_crossattn).",
                stacklevel=2,
            )
        return False


def _bound_to(method, owner) -> bool:
    return getattr(method, "__self__", None) is owner
