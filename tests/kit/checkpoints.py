"""Test kit: tiny models written as original-layout (CompVis/ldm) single files, as ComfyUI and A1111 save them.

The library only reads that layout (engine/models/single_file.py, through diffusers' converters); writing it is
needed only to make the test checkpoints, so the writer lives here. The name maps are built from the diffusers
configs (levels, blocks per level, which levels have attention, transformer depth), so the same code writes tiny
test models and real SD1.5/SD2.1/SDXL layouts; diffusers' converters reading the files back is tested.
"""
from __future__ import annotations

import json

import torch

from protobooth.engine.compat import text_tensors
from protobooth.engine.errors import InputError
from protobooth.engine.fileio import save_safetensors
from protobooth.engine.models.single_file import (BIG_G_PREFIX, CLIP_L_PREFIX, HINTS_METADATA_KEY, OPEN_CLIP_PREFIX,
                                                  SDXL_CLIP_L_PREFIX, UNET_PREFIX, V_PREDICTION_MARKER, VAE_PREFIX)

# Renames inside one module: the part of a parameter name between the module prefix and ".weight"/".bias".
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: diffusers has Linear layers where the original has 1x1 convolutions.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME: dict[str, str] = {}


def unet_module_map(config) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module prefix -> (original module prefix, renames inside the module), for an SD1/SD2/SDXL UNet."""
    _require_ldm_unet(config)
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block
    modules = {
        "time_embedding.linear_1.": ("time_embed.0.", _SAME),
        "time_embedding.linear_2.": ("time_embed.2.", _SAME),
        "conv_in.": ("input_blocks.0.0.", _SAME),
        "mid_block.resnets.0.": ("middle_block.0.", _UNET_RESNET),
        "conv_norm_out.": ("out.0.", _SAME),
        "conv_out.": ("out.2.", _SAME),
    }
    if config.mid_block_type == "UNetMidBlock2DCrossAttn":  # else one resnet alone (SSD-1B)
        modules["mid_block.attentions.0."] = ("middle_block.1.", _SAME)
        modules["mid_block.resnets.1."] = ("middle_block.2.", _UNET_RESNET)
    if config.addition_embed_type == "text_time":  # SDXL's pooled text and size conditioning
        modules["add_embedding.linear_1."] = ("label_emb.0.0.", _SAME)
        modules["add_embedding.linear_2."] = ("label_emb.0.2.", _SAME)
    # input_blocks: conv_in, then per level `per_level` x (resnet [+ transformer]), then a downsampler
    # except after the last level.
    block = 1
    for level, block_type in enumerate(config.down_block_types):
        for i in range(per_level):
            modules[f"down_blocks.{level}.resnets.{i}."] = (f"input_blocks.{block}.0.", _UNET_RESNET)
            if block_type.startswith("CrossAttn"):
                modules[f"down_blocks.{level}.attentions.{i}."] = (f"input_blocks.{block}.1.", _SAME)
            block += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{block}.0.op.", _SAME)
            block += 1
    # output_blocks: per level `per_level + 1` x (resnet [+ transformer]); the level's last block also
    # holds the upsampler, after the transformer when there is one.
    block = 0
    for level, block_type in enumerate(config.up_block_types):
        attention = block_type.startswith("CrossAttn")
        for i in range(per_level + 1):
            modules[f"up_blocks.{level}.resnets.{i}."] = (f"output_blocks.{block}.0.", _UNET_RESNET)
            if attention:
                modules[f"up_blocks.{level}.attentions.{i}."] = (f"output_blocks.{block}.1.", _SAME)
            block += 1
        if level < levels - 1:
            upsampler = f"output_blocks.{block - 1}.{2 if attention else 1}.conv."
            modules[f"up_blocks.{level}.upsamplers.0.conv."] = (upsampler, _SAME)
    return modules


def vae_module_map(config) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module prefix -> (original module prefix, renames inside the module), for SD's VAE."""
    levels = len(config.block_out_channels)
    modules = {
        "quant_conv.": ("quant_conv.", _SAME),
        "post_quant_conv.": ("post_quant_conv.", _SAME),
    }
    for part in ("encoder", "decoder"):
        modules[f"{part}.conv_in."] = (f"{part}.conv_in.", _SAME)
        modules[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", _SAME)
        modules[f"{part}.conv_out."] = (f"{part}.conv_out.", _SAME)
        modules[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        modules[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        modules[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for level in range(levels):
        for i in range(config.layers_per_block):
            modules[f"encoder.down_blocks.{level}.resnets.{i}."] = (f"encoder.down.{level}.block.{i}.", _VAE_RESNET)
        if level < levels - 1:
            modules[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (f"encoder.down.{level}.downsample.conv.", _SAME)
    # The original decoder numbers its levels from the lowest resolution up; diffusers from the top down.
    for level in range(levels):
        original = levels - 1 - level
        for i in range(config.layers_per_block + 1):
            modules[f"decoder.up_blocks.{level}.resnets.{i}."] = (f"decoder.up.{original}.block.{i}.", _VAE_RESNET)
        if level < levels - 1:
            modules[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"decoder.up.{original}.upsample.conv.", _SAME)
    return modules


def original_names(names, module_map, prefix: str) -> dict[str, str]:
    """Map diffusers parameter names to original names (with `prefix`); every name must be covered."""
    mapped, unmapped = {}, []
    # Longest prefix first, so "mid_block.resnets.1." is never taken for "mid_block.resnets.10.".
    ordered = sorted(module_map.items(), key=lambda item: -len(item[0]))
    for name in names:
        for module, (original, renames) in ordered:
            if name.startswith(module):
                inner, leaf = name[len(module) :].rpartition(".")[::2]
                inner = renames.get(inner, inner)
                mapped[name] = prefix + original + (f"{inner}.{leaf}" if inner else leaf)
                break
        else:
            unmapped.append(name)
    if unmapped:
        raise InputError(
            f"{len(unmapped)} tensors (e.g. {unmapped[0]!r}) have no place in the original SD1/SD2 checkpoint layout; "
            "only plain Stable Diffusion 1.x, 2.x and SDXL models can be written as single files."
        )
    return mapped


def open_clip_names(num_layers: int, prefix: str = OPEN_CLIP_PREFIX) -> dict[str, tuple[str, ...]]:
    """Original OpenCLIP text-tower name -> transformers CLIPTextModel names (q, k, v are fused in one)."""
    names = {
        prefix + "token_embedding.weight": ("embeddings.token_embedding.weight",),
        prefix + "positional_embedding": ("embeddings.position_embedding.weight",),
        prefix + "ln_final.weight": ("final_layer_norm.weight",),
        prefix + "ln_final.bias": ("final_layer_norm.bias",),
    }
    for i in range(num_layers):
        block, layer = f"{prefix}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            names[f"{block}ln_1.{leaf}"] = (f"{layer}layer_norm1.{leaf}",)
            names[f"{block}ln_2.{leaf}"] = (f"{layer}layer_norm2.{leaf}",)
            names[f"{block}attn.in_proj_{leaf}"] = tuple(f"{layer}self_attn.{p}_proj.{leaf}" for p in "qkv")
            names[f"{block}attn.out_proj.{leaf}"] = (f"{layer}self_attn.out_proj.{leaf}",)
            names[f"{block}mlp.c_fc.{leaf}"] = (f"{layer}mlp.fc1.{leaf}",)
            names[f"{block}mlp.c_proj.{leaf}"] = (f"{layer}mlp.fc2.{leaf}",)
    return names


def architecture_hints(model) -> dict:
    """The settings of `model` that tensor shapes do not show.

    Real checkpoints follow fixed rules for these (SD1 UNet 8 heads, SD2 64-channel heads, 64-channel
    text-encoder heads, GroupNorm 32); tiny test models do not, so the writer records them and the
    reader prefers them to the rules.
    """
    unet, vae = model.unet.config, model.vae.config
    if model.family == "sdxl":  # diffusers' folder names for SDXL's two text encoders
        encoders = {"text_encoder": model.text_encoder.clip_l.config, "text_encoder_2": model.text_encoder.clip_g.config}
    else:
        encoders = {"text_encoder": model.text_encoder.config}
    return {
        "family": model.family,
        "prediction_type": model.prediction_type,
        "unet": {
            "attention_head_dim": unet.attention_head_dim,
            "norm_num_groups": unet.norm_num_groups,
            "sample_size": unet.sample_size,
        },
        "vae": {
            "norm_num_groups": vae.norm_num_groups,
            "sample_size": vae.sample_size,
            "scaling_factor": vae.scaling_factor,
        },
        **{name: {"num_attention_heads": config.num_attention_heads} for name, config in encoders.items()},
    }


def ldm_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors of `model` (a DiffusionModel) under their original single-file names.

    Tensors are shared with the model where no reshaping is needed; copy before modifying.
    SD2's text encoder is written as OpenCLIP with one more block than the diffusers model: SD2 uses
    the penultimate layer, so the last block is unused; it is written as an identity (all-zero) block.
    SDXL's bigG is written with every block (its last one makes the pooled embedding) and its text projection.
    """
    state: dict[str, torch.Tensor] = {}
    unet = model.unet.state_dict()
    names = original_names(unet, unet_module_map(model.unet.config), UNET_PREFIX)
    state.update({names[name]: tensor for name, tensor in unet.items()})

    vae = model.vae.state_dict()
    names = original_names(vae, vae_module_map(model.vae.config), VAE_PREFIX)
    for name, tensor in vae.items():
        if ".mid_block.attentions." in name and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear weight -> 1x1 convolution weight
        state[names[name]] = tensor

    if model.family == "sd1":
        state.update(_clip_l_state(model.text_encoder, CLIP_L_PREFIX))
    elif model.family == "sd2":
        state.update(_open_clip_state(model.text_encoder, OPEN_CLIP_PREFIX, unused_block=True))
    elif model.family == "sdxl":
        state.update(_clip_l_state(model.text_encoder.clip_l, SDXL_CLIP_L_PREFIX))
        state.update(_open_clip_state(model.text_encoder.clip_g, BIG_G_PREFIX, unused_block=False))
    else:
        raise InputError(f"Model family {model.family!r} cannot be written as an SD1/SD2/SDXL single file.")

    if model.prediction_type == "v_prediction":
        state[V_PREDICTION_MARKER] = torch.tensor([])
    return state


def _clip_l_state(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L under transformers names, with the position ids real files hold."""
    state = {prefix + name: tensor for name, tensor in text_tensors(encoder).items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(encoder.config.max_position_embeddings)[None]
    return state


def _open_clip_state(encoder, prefix: str, unused_block: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower: SD2's with an unused identity block after the last (see ldm_state_dict), SDXL's bigG
    with its projection (stored [width, projection]: OpenCLIP multiplies features @ text_projection)."""
    text = text_tensors(encoder)
    layers = encoder.config.num_hidden_layers
    state = {}
    for original, parts in open_clip_names(layers, prefix).items():
        state[original] = text[parts[0]] if len(parts) == 1 else torch.cat([text[p] for p in parts])
    if unused_block:  # zero projections make it pass its input through
        last, unused = f"{prefix}transformer.resblocks.{layers - 1}.", f"{prefix}transformer.resblocks.{layers}."
        for original in [name for name in state if name.startswith(last)]:
            state[unused + original[len(last) :]] = torch.zeros_like(state[original])
    if "text_projection.weight" in text:
        state[prefix + "text_projection"] = text["text_projection.weight"].T
    else:  # SD2 does not use it
        width = encoder.config.hidden_size
        state[prefix + "text_projection"] = torch.eye(width, dtype=state[prefix + "ln_final.weight"].dtype)
    return state


def write_single_file(model, path, dtype: torch.dtype = torch.float16) -> None:
    """Write `model` as one original-layout .safetensors checkpoint (floats as `dtype`), atomically."""
    state = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in ldm_state_dict(model).items()
    }
    metadata = {HINTS_METADATA_KEY: json.dumps(architecture_hints(model), sort_keys=True)}
    save_safetensors(state, path, metadata=metadata)


def _require_ldm_unet(config) -> None:
    """The original layout has no class embeddings, added conditioning only as SDXL's, one block count for every
    level, and a middle block of resnet-attention-resnet or (SSD-1B) one resnet."""
    problems = []
    if config.class_embed_type is not None or config.addition_embed_type not in (None, "text_time"):
        problems.append("it has class or added-condition embeddings other than SDXL's")
    if not isinstance(config.layers_per_block, int):
        problems.append("its levels have different numbers of blocks")
    if config.mid_block_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        problems.append(f"its middle block is {config.mid_block_type}")
    if problems:
        raise InputError(
            "This UNet cannot be written in the original SD1/SD2/SDXL layout: " + "; ".join(problems) + "."
        )
