"""UNet configs of public Stable Diffusion checkpoints, and tiny random-weight pipelines.

The full configs are those of the checkpoints' unet/config.json (runwayml SD 1.5,
stabilityai SD 2.1, stabilityai SDXL base 1.0). Speed does not depend on weight values, so a
UNet built from them times like the real one. The tiny pipelines have the same block layout
with a few channels: they let anyone check an install, and the tests run on them, without
downloading anything.
"""

import contextlib
import json
import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD21 = dict(SD15, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, sample_size=96)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
UNET_CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}
# (text length, width) of the prompt embeddings each UNet takes
CONTEXT = {"sd15": (77, 768), "sd21": (77, 1024), "sdxl": (77, 2048)}

# The SD 1.x/2.x/SDXL VAE (8x downsampling)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, sample_size=512,
)  # fmt: skip

# Same block layout, a few channels (GroupNorm groups shrunk to fit).
_TINY_TIME_DIM = 8
_TINY_POOLED_DIM = 32
TINY_UNET_CONFIGS = {
    "sd15": dict(SD15, block_out_channels=[16, 32, 32, 32], layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=2, norm_num_groups=8, sample_size=8),
    "sd21": dict(SD21, block_out_channels=[16, 32, 32, 32], layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=[1, 2, 2, 2], norm_num_groups=8, sample_size=8),
    "sdxl": dict(SDXL, block_out_channels=[16, 32, 64], layers_per_block=1, cross_attention_dim=32,
                 transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 4], norm_num_groups=8,
                 addition_time_embed_dim=_TINY_TIME_DIM,
                 projection_class_embeddings_input_dim=_TINY_POOLED_DIM + 6 * _TINY_TIME_DIM, sample_size=8),
}  # fmt: skip

# The SD 1.x/2.x and SDXL scheduler configs (scaled-linear betas, "leading" spacing, offset 1).
_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading",
)  # fmt: skip


def unet_from_config(kind: str, *, tiny: bool = False, seed: int = 0, device=None) -> UNet2DConditionModel:
    """A random-weight UNet: "sd15", "sd21" or "sdxl", full size or tiny; its weights drawn on `device`
    (SDXL's 2.6 billion take a minute on a CPU, a moment on a GPU)."""
    configs = TINY_UNET_CONFIGS if tiny else UNET_CONFIGS
    if kind not in configs:
        raise ValueError(f"kind must be one of {sorted(configs)}, got {kind!r}")
    with _on(device, seed):
        return UNet2DConditionModel(**configs[kind])


@contextlib.contextmanager
def _on(device, seed: int):
    """New tensors on `device`, drawn from torch's generators seeded with `seed` (restored after)."""
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        yield


def random_pipeline(kind: str, *, seed: int = 0, device=None, dtype=None):
    """A full-size pipeline with random weights and no text encoders, for timing: call it with
    prompt_embeds (and for SDXL pooled_prompt_embeds), shaped as CONTEXT says. Weights are drawn on
    `device` and cast to `dtype`."""
    unet = unet_from_config(kind, seed=seed, device=device).to(dtype=dtype)
    with _on(device, seed + 1):
        vae = AutoencoderKL(**SD_VAE).to(dtype=dtype)
    if kind != "sdxl":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet,
            scheduler=PNDMScheduler(**_SCHEDULER, skip_prk_steps=True), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in _SCHEDULER.items() if k != "set_alpha_to_one"}),
    )  # fmt: skip


def tiny_pipeline(kind: str = "sd15", *, seed: int = 0):
    """A StableDiffusionPipeline ("sd15", "sd21") or StableDiffusionXLPipeline ("sdxl") with tiny
    random weights and a character-level CLIP tokenizer: it runs in seconds and draws noise."""
    unet = unet_from_config(kind, tiny=True, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        )  # fmt: skip
        tokenizer = _tiny_tokenizer()
        text = dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=_TINY_POOLED_DIM,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        if kind != "sdxl":
            return StableDiffusionPipeline(
                vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer, unet=unet,
                scheduler=PNDMScheduler(**_SCHEDULER, skip_prk_steps=True), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        half = dict(text, hidden_size=16, intermediate_size=32)  # the two encoders' widths add up to 32
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**half)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**half)),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(**{k: v for k, v in _SCHEDULER.items() if k != "set_alpha_to_one"}),
        )  # fmt: skip


def _tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: one token per character, built from two small files."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    words = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        with open(f"{folder}/vocab.json", "w") as f:
            json.dump({w: i for i, w in enumerate(words)}, f)
        with open(f"{folder}/merges.txt", "w") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)
