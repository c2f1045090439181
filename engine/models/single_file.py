"""Stable Diffusion in the original (CompVis/ldm) single-file layout: what a file holds, what its tensors' shapes
say about the model, and its tensors under diffusers' names.

That layout is what ComfyUI, A1111 and diffusers' `from_single_file` read: the UNet under `model.diffusion_model.*`,
the VAE under `first_stage_model.*`, the text encoder under `cond_stage_model.transformer.text_model.*` (SD1:
OpenAI CLIP-L, transformers names) or `cond_stage_model.model.*` (SD2: OpenCLIP ViT-H, q/k/v fused). ComfyUI
keeps a loaded UNet and VAE under the same names, without the prefix.

Names are converted by diffusers' own converters (loaders.single_file_utils), which run offline; for the UNet and
VAE they map names without copying a tensor, so the ComfyUI views share the graph's storage through them too.
What diffusers cannot do offline is the configuration (its builders read the original yaml, which from_single_file
downloads), so it is read here from the shapes, by the rules real checkpoints follow (the family record: heads),
or from the hints a file written by the test kit records for tiny models that follow no rule. This is the one
reader of the layout: files (loading.py) and ComfyUI's loaded models (nodes/bridge.py) both use it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..errors import InputError
from ..fileio import read_torch_file
from .families import family

log = logging.getLogger("protobooth")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "cond_stage_model.transformer.text_model."
OLD_CLIP_L_PREFIX = "cond_stage_model.transformer."  # older tools left out "text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
V_PREDICTION_MARKER = "v_pred"  # an empty tensor ComfyUI writes into checkpoints it saves from v-prediction models
HINTS_METADATA_KEY = "protobooth.architecture"  # settings shapes cannot show, recorded by the test kit's writer
PREDICTION_TYPES = ("epsilon", "v_prediction")
FIX_PATH = "Give a Stable Diffusion 1.x/2.x .safetensors checkpoint or a diffusers model folder (with model_index.json)."
# ComfyUI's rule for SD2 checkpoints without a marker: the 768-px v-prediction releases have much more spread in
# this LayerNorm bias than the 512-px epsilon ones.
_SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_PROBE_STD = 0.09
_PROJ_IN = re.compile(re.escape(UNET_PREFIX) + r"input_blocks\.\d+\.1\.proj_in\.weight")


class CheckpointFile:
    """The tensors of a single-file checkpoint: shapes up front, tensors read one at a time."""

    SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

    def __init__(self, path: Path):
        self.path = path
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._file = safe_open(str(path), framework="pt", device="cpu")
                self.shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in self._file.keys()}
            except Exception as error:  # safetensors raises its own error types for bad headers and sizes
                raise InputError(
                    f"{path} is not a readable safetensors file ({error}). It may be incomplete: download it again."
                ) from None
            self.metadata = self._file.metadata() or {}
        elif suffix in (".ckpt", ".pt", ".pth"):
            self._file = _torch_load_weights(path)
            self.shapes = {name: tuple(tensor.shape) for name, tensor in self._file.items()}
            self.metadata = {}
        else:
            raise InputError(f"{path} is not a model file ProtoBooth reads ({', '.join(self.SUFFIXES)}). {FIX_PATH}")

    def tensor(self, name: str) -> torch.Tensor:
        if isinstance(self._file, dict):
            return self._file[name]
        try:
            return self._file.get_tensor(name)
        except Exception as error:
            raise InputError(f"Could not read tensor {name!r} from {self.path} ({error}). Download the file again.") from None

    def tensors(self, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` (names kept), floats as `dtype`."""
        return {name: _as(self.tensor(name), dtype) for name in self.shapes if name.startswith(prefix)}

    def hints(self) -> dict:
        """Settings recorded by the test kit's writer (empty for files from elsewhere)."""
        try:
            return json.loads(self.metadata.get(HINTS_METADATA_KEY, "{}"))
        except json.JSONDecodeError:
            return {}


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _torch_load_weights(path: Path) -> dict[str, torch.Tensor]:
    data = read_torch_file(path, "model file")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # PyTorch Lightning layout, as in the original SD releases
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not a dictionary of model weights. {FIX_PATH}")
    return {name: tensor for name, tensor in data.items() if isinstance(tensor, torch.Tensor)}


# ------------------------------------------------------------------------------------------------ what it is


def not_supported(path, kind: str) -> InputError:
    return InputError(
        f"{path} is a {kind} model, which ProtoBooth does not support yet (supported: Stable Diffusion 1.x and 2.x; "
        "SDXL is planned). Choose an SD1.x or SD2.x base model."
    )


def family_from_shapes(shapes: dict[str, tuple], path) -> str:
    """'sd1' or 'sd2' for an original-layout checkpoint; InputError naming anything else."""
    names = shapes.keys()
    if any(name.endswith("double_blocks.0.img_attn.norm.key_norm.scale") for name in names):
        raise not_supported(path, "Flux")
    if any("joint_blocks.0.context_block." in name for name in names):
        raise not_supported(path, "Stable Diffusion 3")
    if any(name.startswith("conditioner.embedders.") for name in names):
        raise not_supported(path, family("sdxl").label)
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise not_supported(path, "class-conditioned (SDXL-style or SD2 unCLIP)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise InputError(f"{path} is not a Stable Diffusion checkpoint: {_what_else(names)} {FIX_PATH}")
    if conv_in[1] != 4:
        raise not_supported(path, {9: "SD inpainting", 8: "InstructPix2Pix"}.get(conv_in[1], f"{conv_in[1]}-channel"))

    if any(name.startswith(OLD_CLIP_L_PREFIX) for name in names):
        found = "sd1"
    elif any(name.startswith(OPEN_CLIP_PREFIX) for name in names):
        found = "sd2"
    else:
        raise InputError(f"{path} holds a UNet but no text encoder (no cond_stage_model.* tensors). ProtoBooth needs a "
                         "full checkpoint with UNet, VAE and text encoder.")
    if not any(name.startswith(VAE_PREFIX) for name in names):
        raise InputError(f"{path} has no VAE (first_stage_model.* tensors). Use a checkpoint with its VAE baked in.")
    proj_in = next((shape for name, shape in shapes.items() if _PROJ_IN.fullmatch(name)), None)
    if proj_in is None:
        raise InputError(f"{path} has a UNet without attention layers; it is not a standard SD1.x/2.x checkpoint.")
    if (len(proj_in) == 2) != (found == "sd2"):
        raise InputError(
            f"{path} mixes SD1 and SD2 parts ({'linear' if len(proj_in) == 2 else 'convolution'} UNet projections with "
            f"the {'OpenCLIP' if found == 'sd2' else 'CLIP-L'} text encoder); it is not a standard SD1.x/2.x checkpoint."
        )
    return found


def _what_else(names) -> str:
    """A guess at what a non-SD file is, so the message can say more than 'wrong file'."""
    names = list(names)
    if any("lora_" in name or ".lora." in name for name in names):
        return "it looks like a LoRA; load a base model here and the LoRA separately."
    if any(name.startswith(("encoder.", "decoder.")) for name in names):
        return "it looks like a stand-alone VAE."
    if len(names) <= 4 and any(n in ("emb_params", "string_to_param", "clip_l", "clip_g") for n in names):
        return "it looks like a textual-inversion embedding."
    if any(name.startswith(("down_blocks.", "unet.")) for name in names):
        return "it looks like diffusers-format weights; give the folder that contains model_index.json instead."
    return "it has none of the model.diffusion_model.* tensors of an SD1.x/2.x checkpoint."


def prediction_type(checkpoint: CheckpointFile, family_name: str) -> str:
    """ComfyUI's v_pred marker, else the file's hints, else SD1: epsilon; SD2: ComfyUI's LayerNorm-bias rule."""
    if V_PREDICTION_MARKER in checkpoint.shapes:
        return "v_prediction"
    recorded = checkpoint.hints().get("prediction_type")
    if recorded in PREDICTION_TYPES:
        return recorded
    if family_name != "sd2":
        return "epsilon"
    if _SD2_V_PROBE in checkpoint.shapes:
        spread = checkpoint.tensor(_SD2_V_PROBE).float().std(unbiased=False).item()
        guess = "v_prediction" if spread > _SD2_V_PROBE_STD else "epsilon"
        log.info("%s: SD2 checkpoint treated as %s (LayerNorm-bias rule); pass prediction_type= to override.",
                 checkpoint.path, guess)
        return guess
    log.warning("%s: cannot tell whether this SD2 model predicts epsilon or v; assuming epsilon. "
                "Pass prediction_type='v_prediction' if it is a v-model.", checkpoint.path)
    return "epsilon"


# ------------------------------------------------------------------------------------------ configuration


def _count(shapes, pattern: str) -> int:
    count = 0
    while any(name.startswith(pattern.format(count)) for name in shapes):
        count += 1
    return count


def unet_config(shapes, family_name: str, prediction: str, prefix: str = UNET_PREFIX) -> dict:
    """UNet2DConditionModel arguments from the shapes of an original-layout UNet (names under `prefix`)."""
    p = prefix
    levels = []  # per level: [blocks, channels, transformer depth (0: no attention)]
    current = [0, 0, 0]
    block = 1
    while True:
        where = f"{p}input_blocks.{block}."
        if where + "0.op.weight" in shapes:  # a downsampler ends a level
            levels.append(current)
            current = [0, 0, 0]
        elif where + "0.in_layers.0.weight" in shapes:
            current[0] += 1
            current[1] = shapes[where + "0.out_layers.3.weight"][0]
            current[2] = _count(shapes, where + "1.transformer_blocks.{}.")
        else:
            break
        block += 1
    levels.append(current)
    blocks = {level[0] for level in levels}
    if len(blocks) != 1:
        raise InputError("This UNet has levels with different block counts; it is not a standard SD1.x/2.x UNet.")
    channels = [level[1] for level in levels]
    attention = [level[2] > 0 for level in levels]
    middle_depth = _count(shapes, p + "middle_block.1.transformer_blocks.{}.")
    depths = [level[2] or middle_depth for level in levels]
    first_attention = next(f"{p}input_blocks.{i}.1." for i in range(1, block) if f"{p}input_blocks.{i}.1.proj_in.weight" in shapes)
    record = family(family_name)
    return {
        "sample_size": record.native_size(prediction) // 8,
        "in_channels": shapes[p + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[p + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": blocks.pop(),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "cross_attention_dim": shapes[first_attention + "transformer_blocks.0.attn2.to_k.weight"][1],
        "use_linear_projection": len(shapes[first_attention + "proj_in.weight"]) == 2,
        "norm_num_groups": 32,
        # diffusers calls the number of heads attention_head_dim: SD1 has 8; SD2 heads of 64 channels.
        "attention_head_dim": record.unet_heads or [c // record.unet_head_channels for c in channels],
    }


def vae_config(shapes, sample_size: int, prefix: str = VAE_PREFIX, scaling_factor: float = family("sd1").latent_scaling) -> dict:
    """AutoencoderKL arguments from the shapes of SD's KL autoencoder in the original layout (names under `prefix`)."""
    p = prefix
    levels = _count(shapes, p + "encoder.down.{}.block.0.conv1.weight")
    if not levels or p + "quant_conv.weight" not in shapes or p + "encoder.mid.attn_1.q.weight" not in shapes:
        raise InputError("this VAE is not Stable Diffusion's KL autoencoder (the layout of SD1.x/SD2.x VAEs).")
    return {
        "in_channels": shapes[p + "encoder.conv_in.weight"][1],
        "out_channels": shapes[p + "decoder.conv_out.weight"][0],
        "latent_channels": shapes[p + "decoder.conv_in.weight"][1],
        "block_out_channels": [shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        "layers_per_block": _count(shapes, p + "encoder.down.0.block.{}.conv1.weight"),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "norm_num_groups": 32,
    }


def clip_l_prefix(shapes) -> str:
    return CLIP_L_PREFIX if CLIP_L_PREFIX + "embeddings.token_embedding.weight" in shapes else OLD_CLIP_L_PREFIX


def text_sizes(shapes, family_name: str) -> dict:
    """The text encoder's sizes (CLIPTextConfig arguments) from its shapes."""
    if family_name == "sd2":
        p = OPEN_CLIP_PREFIX
        vocab_size, width = shapes[p + "token_embedding.weight"]
        sizes = {
            "num_hidden_layers": _count(shapes, p + "transformer.resblocks.{}.ln_1.weight") - 1,  # SD2 skips the last
            "intermediate_size": shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
            "max_position_embeddings": shapes[p + "positional_embedding"][0],
        }
    else:
        p = clip_l_prefix(shapes)
        vocab_size, width = shapes[p + "embeddings.token_embedding.weight"]
        sizes = {
            "num_hidden_layers": _count(shapes, p + "encoder.layers.{}.mlp.fc1.weight"),
            "intermediate_size": shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
            "max_position_embeddings": shapes[p + "embeddings.position_embedding.weight"][0],
        }
    return {**sizes, "vocab_size": vocab_size, "hidden_size": width, "num_attention_heads": max(1, width // 64)}


def configs(checkpoint: CheckpointFile, family_name: str, prediction: str, use_hints: bool = True):
    """(UNet kwargs, VAE kwargs, CLIPTextConfig) of a checkpoint, from its shapes and, unless told not to, its hints."""
    hints = checkpoint.hints() if use_hints else {}
    unet = {**unet_config(checkpoint.shapes, family_name, prediction), **hints.get("unet", {})}
    vae = {**vae_config(checkpoint.shapes, sample_size=unet["sample_size"] * 8), **hints.get("vae", {})}
    text = {**text_sizes(checkpoint.shapes, family_name), **hints.get("text_encoder", {})}
    return unet, vae, family(family_name).text_encoder_config(**text)


# ----------------------------------------------------------------------------------- tensors, diffusers names


def unet_tensors(tensors: dict[str, torch.Tensor], config: dict, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """An original-layout UNet's tensors (names under `prefix`) under diffusers' names, not copied."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    named = {UNET_PREFIX + name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return _converted(lambda: convert_ldm_unet_checkpoint(named, config), "UNet")


def vae_tensors(tensors: dict[str, torch.Tensor], config: dict, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """An original-layout VAE's tensors under diffusers' names; its 1x1 attention convolutions become Linear weights by
    indexing, still the same storage."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    named = {VAE_PREFIX + name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return _converted(lambda: convert_ldm_vae_checkpoint(named, config), "VAE")


def text_tensors(tensors: dict[str, torch.Tensor], family_name: str, text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder's tensors under transformers CLIPTextModel names (SD2's unused last OpenCLIP block left out)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family_name == "sd2":
        converted = _converted(lambda: convert_open_clip_checkpoint(text_encoder, dict(tensors)), "text encoder")
    else:
        converted = _converted(lambda: convert_ldm_clip_checkpoint(dict(tensors)), "text encoder")
    names = {name.removeprefix("text_model."): t for name, t in converted.items()}
    wanted = text_encoder.state_dict()
    return {name: t for name, t in names.items() if name in wanted}


def _converted(convert, part: str) -> dict[str, torch.Tensor]:
    try:
        return convert()
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(f"the {part}'s tensors do not make a standard SD1.x/2.x {part} ({error!r}); the file is "
                         "incomplete or another kind of model.") from None
