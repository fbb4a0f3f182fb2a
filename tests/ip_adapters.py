"""Tiny random IP-Adapters for a UNet, as state dicts in the layout of the published checkpoints (the
layout `load_ip_adapter` converts): plain, plus (perceiver resampler), FaceID and full-face."""

import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection

IMAGE_EMBED_DIM = 32  # width of the image encoder's output the adapter expects


def ip_adapter_state_dict(unet, kind: str = "plain", seed: int = 0) -> dict:
    """{"image_proj": ..., "ip_adapter": ...} with random weights for `unet` (kinds: plain, plus,
    faceid, full)."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    return {"image_proj": _image_projection(kind, dim, g), "ip_adapter": _cross_attention_weights(unet, g)}


def load_ip_adapter(pipe, kind: str = "plain") -> None:
    """A tiny random IP-Adapter of `kind` loaded into `pipe` as a user loads a checkpoint (no image
    encoder: calls pass ip_adapter_image_embeds)."""
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet, kind), subfolder="", weight_name="", image_encoder_folder=None)


def image_embeds(kind: str, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """What `ip_adapter_image_embeds=[...]` takes: negative and positive embeddings, (2 * batch, 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    shape = (2 * batch, 1, 5, IMAGE_EMBED_DIM) if kind == "plus" else (2 * batch, 1, IMAGE_EMBED_DIM)
    return torch.randn(shape, generator=g)


def _cross_attention_weights(unet, g) -> dict:
    """to_k_ip / to_v_ip of every cross-attention, numbered 1, 3, 5, ... in attn_processors order (the
    checkpoints count self- and cross-attentions together)."""
    weights, number = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for which in ("k", "v"):
            weights[f"{number}.to_{which}_ip.weight"] = torch.randn(attn.inner_dim, unet.config.cross_attention_dim, generator=g) * 0.1
        number += 2
    return weights


def _image_projection(kind: str, dim: int, g) -> dict:
    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    tokens = 4
    if kind == "plain":  # ImageProjection: a linear map to `tokens` tokens, then a layer norm
        return {"proj.weight": rand(dim * tokens, IMAGE_EMBED_DIM), "proj.bias": rand(dim * tokens),
                "norm.weight": 1 + rand(dim), "norm.bias": rand(dim)}  # fmt: skip
    if kind == "faceid":  # a two-layer MLP (x2 wide) to `tokens` tokens, then a layer norm
        return {"proj.0.weight": rand(2 * IMAGE_EMBED_DIM, IMAGE_EMBED_DIM), "proj.0.bias": rand(2 * IMAGE_EMBED_DIM),
                "proj.2.weight": rand(dim * tokens, 2 * IMAGE_EMBED_DIM), "proj.2.bias": rand(dim * tokens),
                "norm.weight": 1 + rand(dim), "norm.bias": rand(dim)}  # fmt: skip
    if kind == "full":  # one token per image-encoder token: MLP then layer norm
        return {"proj.0.weight": rand(IMAGE_EMBED_DIM, IMAGE_EMBED_DIM), "proj.0.bias": rand(IMAGE_EMBED_DIM),
                "proj.2.weight": rand(dim, IMAGE_EMBED_DIM), "proj.2.bias": rand(dim),
                "proj.3.weight": 1 + rand(dim), "proj.3.bias": rand(dim)}  # fmt: skip
    if kind == "plus":
        return _checkpoint_names_of_resampler(dim, tokens, g)
    raise ValueError(f"kind must be plain, plus, faceid or full, got {kind!r}")


def _checkpoint_names_of_resampler(dim: int, tokens: int, g) -> dict:
    """A random perceiver resampler (diffusers' IPAdapterPlusImageProjection, one head of 64) under the
    names of the published plus checkpoints: layer i's attention is `layers.i.0` (norm1, norm2, to_q,
    to_kv, to_out), its feed-forward `layers.i.1` (0: norm, 1 and 3: linear)."""
    module = IPAdapterPlusImageProjection(embed_dims=IMAGE_EMBED_DIM, output_dims=dim, hidden_dims=64, heads=1,
                                          num_queries=tokens)  # fmt: skip
    renamed = {}
    for name, value in module.state_dict().items():
        value = torch.randn(value.shape, generator=g) * 0.1 + (1 if name.endswith("weight") and value.dim() == 1 else 0)
        if not name.startswith("layers."):
            renamed[name] = value
            continue
        _, layer, rest = name.split(".", 2)
        for theirs, ours in (("ln0", "0.norm1"), ("ln1", "0.norm2"), ("attn.to_q", "0.to_q"), ("attn.to_out.0", "0.to_out"),
                             ("ff.0", "1.0"), ("ff.1.net.0.proj", "1.1"), ("ff.1.net.2", "1.3")):  # fmt: skip
            if rest.startswith(theirs + "."):
                renamed[f"layers.{layer}.{ours}{rest[len(theirs):]}"] = value
        if rest.startswith("attn.to_k."):  # keys and values are one matrix there
            renamed[f"layers.{layer}.0.to_kv{rest[len('attn.to_k'):]}"] = value
        elif rest.startswith("attn.to_v."):
            key = f"layers.{layer}.0.to_kv{rest[len('attn.to_v'):]}"
            renamed[key] = torch.cat([renamed[key], value])
    return renamed
