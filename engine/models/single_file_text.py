"""The text encoders of original-layout single files (single_file.py), as transformers modules.

SD1 has OpenAI CLIP-L (`cond_stage_model.transformer.*`, transformers names already), SD2 OpenCLIP ViT-H
(`cond_stage_model.model.*`, OpenCLIP names, q/k/v fused), SDXL both kinds: CLIP-L at
`conditioner.embedders.0.transformer.*` and OpenCLIP bigG at `conditioner.embedders.1.model.*`, which become the
engine's one SDXLTextEncoder (models/sdxl.py). Sizes come from the shapes (heads of 64 channels, as in every real
checkpoint) unless the file's hints say otherwise; tensors are renamed by diffusers' converters. SD2 uses OpenCLIP's
penultimate block as its last, so the unused last block is left out; SDXL reads the penultimate hidden state itself
and pools bigG's last one, so every bigG block is kept.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .families import family
from .single_file import (BIG_G_PREFIX, CLIP_L_PREFIX, NOT_STANDARD, OLD_CLIP_L_PREFIX, OPEN_CLIP_PREFIX,
                          SDXL_CLIP_L_PREFIX, CheckpointFile, converted, count_numbered)

# Where each part of an SDXL text encoder lies in a file (CLIP-L's converter strips everything before "text_model.").
_SDXL_PARTS = {"clip_l": SDXL_CLIP_L_PREFIX.removesuffix("text_model."), "clip_g": BIG_G_PREFIX}


def pooled_width(shapes) -> int:
    """The width of SDXL's pooled text embedding: bigG's projection, stored [width, projection] (features @ it)."""
    return shapes[BIG_G_PREFIX + "text_projection"][1]


def text_config(shapes, family_name: str, hints: dict):
    """The CLIPTextConfig of SD1's or SD2's text encoder; for SDXL the pair (CLIP-L's, bigG's)."""
    if family_name == "sdxl":
        return _sdxl_configs(shapes, hints)
    if family_name == "sd2":
        sizes = _open_clip_sizes(shapes, OPEN_CLIP_PREFIX, unused_layers=1)
    else:
        sizes = _clip_l_sizes(shapes, _sd1_prefix(shapes))
    return family(family_name).text_encoder_config(**{**sizes, **hints.get("text_encoder", {})})


def build_text_encoder(config) -> torch.nn.Module:
    """The module of a text_config(): a CLIPTextModel, or SDXL's two encoders as one."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if isinstance(config, tuple):
        from .sdxl import SDXLTextEncoder

        config_l, config_g = config
        return SDXLTextEncoder(CLIPTextModel(config_l), CLIPTextModelWithProjection(config_g))
    return CLIPTextModel(config)


def text_tensors(checkpoint: CheckpointFile, family_name: str, text_encoder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The text encoder's tensors from the file, under the names of `text_encoder`'s state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family_name == "sdxl":
        clip_l = checkpoint.tensors(_SDXL_PARTS["clip_l"], dtype)
        big_g = checkpoint.tensors(_SDXL_PARTS["clip_g"], dtype)
        parts = {
            "clip_l": converted(lambda: convert_ldm_clip_checkpoint(clip_l), "CLIP-L text encoder"),
            "clip_g": converted(lambda: convert_open_clip_checkpoint(text_encoder.clip_g, big_g, prefix=BIG_G_PREFIX),
                                "bigG text encoder"),
        }
        return {f"{part}.{name}": tensor for part, tensors in parts.items()
                for name, tensor in _named_as(tensors, getattr(text_encoder, part)).items()}
    if family_name == "sd2":
        tensors = checkpoint.tensors(OPEN_CLIP_PREFIX, dtype)
        found = converted(lambda: convert_open_clip_checkpoint(text_encoder, tensors), "text encoder")
    else:
        tensors = checkpoint.tensors(OLD_CLIP_L_PREFIX, dtype)
        found = converted(lambda: convert_ldm_clip_checkpoint(tensors), "text encoder")
    return _named_as(found, text_encoder)


def _named_as(tensors: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The converted tensors `module` has, under its names: transformers' CLIPTextModel has no "text_model." level (since
    5.6), CLIPTextModelWithProjection does, and converters (by diffusers release and file age) give either. Others
    (position ids, SD2's unused block, logit scale) are left out."""
    wanted = module.state_dict().keys()
    named = {}
    for name, tensor in tensors.items():
        bare = name.removeprefix("text_model.")
        for candidate in (bare, "text_model." + bare):
            if candidate in wanted:
                named[candidate] = tensor
    return named


def _sd1_prefix(shapes) -> str:
    """SD1's CLIP-L prefix: older tools left out "text_model."."""
    return CLIP_L_PREFIX if CLIP_L_PREFIX + "embeddings.token_embedding.weight" in shapes else OLD_CLIP_L_PREFIX


def _sdxl_configs(shapes, hints: dict):
    from .sdxl import text_configs

    clip_l = {**_clip_l_sizes(shapes, SDXL_CLIP_L_PREFIX), **hints.get("text_encoder", {})}
    big_g = {**_open_clip_sizes(shapes, BIG_G_PREFIX), **hints.get("text_encoder_2", {})}
    for size in ("vocab_size", "max_position_embeddings"):
        if clip_l[size] != big_g[size]:
            raise InputError(f"SDXL's text encoders differ in {size} ({clip_l[size]} and {big_g[size]}); {NOT_STANDARD}.")
    return text_configs(width_l=clip_l["hidden_size"], width_g=big_g["hidden_size"],
                        layers_l=clip_l["num_hidden_layers"], layers_g=big_g["num_hidden_layers"],
                        heads_l=clip_l["num_attention_heads"], heads_g=big_g["num_attention_heads"],
                        intermediate_l=clip_l["intermediate_size"], intermediate_g=big_g["intermediate_size"],
                        projection=pooled_width(shapes), vocab_size=clip_l["vocab_size"],
                        max_position_embeddings=clip_l["max_position_embeddings"])


def _clip_l_sizes(shapes, prefix: str) -> dict:
    """A CLIP text encoder's sizes (CLIPTextConfig arguments) from its shapes under transformers names."""
    vocab_size, width = shapes[prefix + "embeddings.token_embedding.weight"]
    return {"num_hidden_layers": count_numbered(shapes, prefix + "encoder.layers.{}.mlp.fc1.weight"),
            "intermediate_size": shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
            "max_position_embeddings": shapes[prefix + "embeddings.position_embedding.weight"][0],
            "vocab_size": vocab_size, "hidden_size": width, "num_attention_heads": max(1, width // 64)}


def _open_clip_sizes(shapes, prefix: str, unused_layers: int = 0) -> dict:
    """An OpenCLIP text tower's sizes from its shapes, its last `unused_layers` blocks left out."""
    vocab_size, width = shapes[prefix + "token_embedding.weight"]
    return {"num_hidden_layers": count_numbered(shapes, prefix + "transformer.resblocks.{}.ln_1.weight") - unused_layers,
            "intermediate_size": shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
            "max_position_embeddings": shapes[prefix + "positional_embedding"][0],
            "vocab_size": vocab_size, "hidden_size": width, "num_attention_heads": max(1, width // 64)}
