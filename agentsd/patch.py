"""apply_patch / remove_patch: the only module that touches diffusers objects.

What a patch installs, all of it undone by remove_patch:
- a forward pre-hook and hook on the UNet: latent size, stage and timestep of the call;
- a forward on every BasicTransformerBlock of the merged levels: its merge plan, from the block
  input X, given up after its last use, then block.py's lean_forward where it computes what
  diffusers' forward does, else diffusers' forward (blocks of deeper levels are left alone);
- AgentSDAttnProcessor on each block's attn1 (the replaced processor is kept inside it);
- with merge_crossattn / merge_mlp, merge and unmerge hooks around attn2 / ff;
- on a pipeline, a wrapper of scheduler.scale_model_input (the stage) and of progress_bar (to
  follow a scheduler swapped in after apply_patch). Parameters and the state_dict are untouched.
"""

import weakref

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from .attention import AgentSDAttnProcessor, is_plain, plain_attention
from .block import is_lean, lean_forward, runs_lean
from .config import K_SCALE2, K_SHORTCUT, RATIO, AgentSDConfig, build_config
from .merge import merge, merge_counts, plan_block, token_grid, unmerge
from .schedule import StageTracker

SUPPORTED = (
    "a diffusers pipeline with a UNet2DConditionModel `.unet` (Stable Diffusion 1.x/2.x, SDXL, their "
    "img2img/inpaint and ControlNet variants) or a UNet2DConditionModel"
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
    seed: int | None = None,
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    scheduler=None,
):
    """Patch `model` (a pipeline or its UNet) with AgentSD in place and return it.

    Without sx/sy/agent_ratio the paper's schedule applies: agent attention (sx=sy=4,
    agent_ratio=0.95) for the first 40% of the denoising trajectory, plain ToMe (sx=sy=2,
    agent_ratio=0.5) after. `scheduler` is needed only to drive a schedule on a bare UNet.
    Re-applying replaces the previous patch; invalid arguments raise before anything changes.
    """
    config = build_config(
        ratio=ratio, sx=sx, sy=sy, agent_ratio=agent_ratio, schedule=schedule, max_downsample=max_downsample,
        k_scale2=k_scale2, k_shortcut=k_shortcut, attn_precision=attn_precision, use_rand=use_rand,
        seed=seed, merge_attn=merge_attn, merge_crossattn=merge_crossattn, merge_mlp=merge_mlp,
    )  # fmt: skip
    unet, pipe = _find_unet(model)
    blocks = transformer_blocks(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no transformer blocks (BasicTransformerBlock) to patch")
    if scheduler is not None and pipe is not None:
        raise ValueError("scheduler is for a bare UNet; a pipeline's own scheduler is followed already")
    if len(config.stages) > 1 and pipe is None and scheduler is None:
        raise ValueError(
            "a schedule of several stages follows the denoising loop through its scheduler: pass the "
            "pipeline (apply_patch(pipe)), or scheduler= with the bare UNet, or one fixed setting "
            "(sx=, sy=, agent_ratio=)"
        )
    if scheduler is not None and not callable(getattr(scheduler, "scale_model_input", None)):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")

    remove_patch(unet)
    patch = UNetPatch(unet, blocks, config)
    if pipe is not None:
        patch.follow_pipeline(pipe)
    elif scheduler is not None:
        patch.tracker.follow(scheduler)
    return model


def remove_patch(model):
    """Undo apply_patch. Harmless on a model that is not patched; returns `model`."""
    unet, _ = _find_unet(model)
    patch = unet.__dict__.pop("_agentsd", None)
    if patch is not None:
        patch.remove()
    return model


def is_patched(model) -> bool:
    return "_agentsd" in _find_unet(model)[0].__dict__


def _find_unet(model):
    """(unet, pipeline or None); TypeError for anything else."""
    pipe = None
    if isinstance(model, DiffusionPipeline):
        pipe, model = model, getattr(model, "unet", None)
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    if isinstance(model, UNet2DConditionModel):
        return model, pipe
    if pipe is not None:
        found = ", ".join(f"{k}={type(v).__name__}" for k, v in pipe.components.items() if isinstance(v, torch.nn.Module))
        raise TypeError(f"agentsd supports {SUPPORTED}; {type(pipe).__name__} has {found or 'no model'}")
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


class UNetPatch:
    """Everything one patched UNet holds, and the hooks that run on each call."""

    def __init__(self, unet: UNet2DConditionModel, blocks, config: AgentSDConfig):
        self.config = config
        # By default only the highest-resolution level with transformer blocks (1 for SD, 2 for SDXL).
        self.max_downsample = config.max_downsample or min(level for level, _ in blocks)
        self.tracker = StageTracker(config.stages)
        self.handles = [
            unet.register_forward_pre_hook(self.before_unet, with_kwargs=True),
            unet.register_forward_hook(self.after_unet),
        ]
        self.processors = []  # (attn1, our processor) to restore
        self.forwards = []  # (block, our forward) to remove
        self.progress_bar_wrapper = None  # (weak pipe, wrapper) to undo
        # Per call, set by before_unet:
        self.latent_size = None
        self.stage = config.stages[0]
        self.seed = None  # None: top-left destinations
        self.timestep = None

        for level, block in blocks:
            if level > self.max_downsample:  # never merged: no hooks, no host time per call
                continue
            # The plan is given up after its last use, before the feed-forward (where a call's memory peaks).
            users = (block.attn1, config.merge_attn), (block.attn2, config.merge_crossattn), (block.ff, config.merge_mlp)
            users = [m for m, wanted in users if wanted and m is not None]
            if not users:  # nothing merges in this block: no plan, no hooks
                continue
            block_merge = BlockMerge(self, block, users[-1])
            if config.merge_attn:
                processor = AgentSDAttnProcessor(
                    block.attn1.processor, block_merge, k_scale2=config.k_scale2, k_shortcut=config.k_shortcut,
                    upcast=config.attn_precision == "fp32", plain=is_plain(block.attn1, block.attn1.processor),
                )  # fmt: skip
                block_merge.run_lean_with(processor)
                block.attn1.set_processor(processor)
                self.processors.append((block.attn1, processor))
            for module in users:
                if module is block.attn1:
                    continue
                self.handles.append(module.register_forward_pre_hook(block_merge.merge_input))
                self.handles.append(module.register_forward_hook(block_merge.unmerge_output))
            block.forward = block_merge.forward
            self.forwards.append((block, block.forward))
        unet._agentsd = self

    def follow_pipeline(self, pipe) -> None:
        """Follow pipe.scheduler, and whichever scheduler the pipe holds when a run starts."""
        self.tracker.follow(pipe.scheduler)
        tracker, pipe_ref = self.tracker, weakref.ref(pipe)
        original = pipe.progress_bar  # every pipeline opens it after setting the timesteps

        def progress_bar(*args, **kwargs):
            tracker.follow(pipe_ref().scheduler)
            return original(*args, **kwargs)

        pipe.progress_bar = progress_bar
        self.progress_bar_wrapper = (pipe_ref, progress_bar)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for attn, processor in self.processors:
            if attn.processor is processor:  # the user may have set another processor since
                attn.set_processor(processor.original)
        for block, forward in self.forwards:
            if block.__dict__.get("forward") is forward:
                del block.forward
        self.tracker.unfollow()
        if self.progress_bar_wrapper is not None:
            pipe_ref, progress_bar = self.progress_bar_wrapper
            pipe = pipe_ref()
            if pipe is not None and pipe.__dict__.get("progress_bar") is progress_bar:
                del pipe.__dict__["progress_bar"]

    def before_unet(self, unet, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.latent_size = tuple(sample.shape[-2:])
        self.stage = self.tracker.stage
        # An odd batch cannot hold both CFG halves, which must share one pattern (as in ToMeSD).
        use_rand = self.config.use_rand and sample.shape[0] % 2 == 0
        self.seed = self.config.seed if use_rand else None
        self.timestep = timestep.to(sample.device) if torch.is_tensor(timestep) else timestep

    def after_unet(self, unet, args, output) -> None:
        self.timestep = None

    def plan_for(self, x: torch.Tensor):
        """The merge plan of a block whose input is x (B, N, C), or None to run it unpatched."""
        num_tokens = x.shape[1]
        grid = token_grid(self.latent_size, num_tokens)
        if grid.downsample > self.max_downsample or grid.height * grid.width != num_tokens:
            return None
        stage = self.stage
        num_dst = (grid.height // stage.sy) * (grid.width // stage.sx)
        num_merged, num_agent_merged = merge_counts(num_tokens, num_dst, stage.ratio, stage.agent_ratio)
        if num_merged == 0:
            return None
        # One destination pattern per level and call (a level's blocks draw the same one): drawn
        # again in every block, it lives only as long as the block's plan.
        return plan_block(x, grid, stage.sy, stage.sx, num_merged, num_agent_merged, self.seed, self.timestep)


class BlockMerge:
    """The merge plan of one transformer block for the current call, and the block's forward and hooks."""

    def __init__(self, patch: UNetPatch, block, last_user):
        self.patch = patch
        self.block = block
        self.last_user = last_user
        self.replaced = block.forward
        self.processor = None  # our attn1 processor, for lean_forward
        self.lean = False
        self.plan = None

    def run_lean_with(self, processor: AgentSDAttnProcessor) -> None:
        """Run lean_forward, with `processor` on attn1, where it computes what the replaced forward does."""
        self.processor = processor
        self.lean = is_lean(self.block, processor.original)

    def plan_of(self, module):
        """The plan, given up here if `module` is its last user in the block."""
        plan = self.plan
        if module is self.last_user:
            self.plan = None
        return plan

    def forward(self, hidden_states, *args, **kwargs):
        """The block's forward under the patch: the plan, then lean_forward where it applies, else
        the forward it replaced."""
        self.plan = self.patch.plan_for(hidden_states)
        if self.lean and runs_lean(self.block, self.processor, hidden_states, args, kwargs):
            return lean_forward(self.block, hidden_states, kwargs["encoder_hidden_states"], self.self_attention)
        return self.replaced(hidden_states, *args, **kwargs)

    def self_attention(self, h, residual):
        """block.attn1(h) + residual in lean_forward."""
        attn = self.block.attn1
        plan = self.plan_of(attn)
        if plan is None:
            return plain_attention(attn, h, h) + residual
        return self.processor.merged_attention(attn, h, None, plan, residual)

    def merge_input(self, module, args):
        plan = self.plan
        if plan is None or not args or args[0].shape[1] != plan.num_tokens:
            return None
        return (merge(args[0], plan), *args[1:])

    def unmerge_output(self, module, args, output):
        plan = self.plan_of(module)
        if plan is None or not args or args[0].shape[1] != plan.num_slots:
            return None
        return unmerge(output, plan)
