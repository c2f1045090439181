"""Stable Diffusion in the original (CompVis/ldm, Stability) single-file layout: what a file holds, what its tensors'
shapes say about the model, and its tensors under diffusers' names.

That layout is what ComfyUI, A1111 and diffusers' `from_single_file` read: the UNet under `model.diffusion_model.*`,
the VAE under `first_stage_model.*`, the text encoder under `cond_stage_model.transformer.text_model.*` (SD1:
OpenAI CLIP-L, transformers names) or `cond_stage_model.model.*` (SD2: OpenCLIP ViT-H, q/k/v fused); SDXL's two
under `conditioner.embedders.0.transformer.text_model.*` (CLIP-L) and `conditioner.embedders.1.model.*` (OpenCLIP
bigG). ComfyUI keeps a loaded UNet and VAE under the same names, without the prefix. The text encoders are read by
single_file_text.py, the UNet and VAE here.

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
SDXL_PREFIX = "conditioner.embedders."  # SDXL's text encoders (and its refiner's)
SDXL_CLIP_L_PREFIX = SDXL_PREFIX + "0.transformer.text_model."
BIG_G_PREFIX = SDXL_PREFIX + "1.model."
REFINER_BIG_G_PREFIX = SDXL_PREFIX + "0.model."  # the refiner has bigG alone, first
V_PREDICTION_MARKER = "v_pred"  # an empty tensor ComfyUI writes into checkpoints it saves from v-prediction models
HINTS_METADATA_KEY = "protobooth.architecture"  # settings shapes cannot show, recorded by the test kit's writer
PREDICTION_TYPES = ("epsilon", "v_prediction")
FIX_PATH = ("Give a Stable Diffusion 1.x, 2.x or SDXL .safetensors checkpoint or a diffusers model folder (with "
            "model_index.json).")
NOT_STANDARD = "the file is incomplete or not a standard SD1.x, SD2.x or SDXL checkpoint"
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
    article = "an" if kind[:1] in "AEIOUaeiou" or kind.startswith("SD") else "a"  # "an SDXL refiner" ("ess-dee")
    return InputError(
        f"{path} is {article} {kind} model, which ProtoBooth does not support (it trains Stable Diffusion 1.x, 2.x and "
        "SDXL base models). Choose an SD1.x, SD2.x or SDXL base model."
    )


def special_unet_kind(in_channels: int, family_label: str) -> str:
    """What a UNet that takes other than the 4 latent channels is, for the message refusing it."""
    return f"{family_label} " + {9: "inpainting", 8: "InstructPix2Pix"}.get(in_channels, f"{in_channels}-channel")


def family_from_shapes(shapes: dict[str, tuple], path) -> str:
    """'sd1', 'sd2' or 'sdxl' for an original-layout checkpoint; InputError naming anything else."""
    names = shapes.keys()
    if any(name.endswith("double_blocks.0.img_attn.norm.key_norm.scale") for name in names):
        raise not_supported(path, "Flux")
    if any("joint_blocks.0.context_block." in name for name in names):
        raise not_supported(path, "Stable Diffusion 3")
    if "edm_mean" in shapes:  # SDXL's layout, but a continuous (EDM) noise schedule and its own latent statistics
        raise not_supported(path, "Playground v2.5 (EDM)")
    found = _sdxl_text_encoders(names, path) if any(name.startswith(SDXL_PREFIX) for name in names) else None
    size_conditioned = UNET_PREFIX + "label_emb.0.0.weight" in shapes
    if size_conditioned and found is None:
        raise not_supported(path, "class-conditioned (SD2 unCLIP-style)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise InputError(f"{path} is not a Stable Diffusion checkpoint: {_what_else(names)} {FIX_PATH}")
    if conv_in[1] != 4:
        raise not_supported(path, special_unet_kind(conv_in[1], "SDXL" if found else "SD"))
    if found == "sdxl" and not size_conditioned:
        raise InputError(f"{path} has SDXL's text encoders but its UNet lacks SDXL's size conditioning "
                         f"(model.diffusion_model.label_emb.*); {NOT_STANDARD}.")

    if found is None and any(name.startswith(OLD_CLIP_L_PREFIX) for name in names):
        found = "sd1"
    elif found is None and any(name.startswith(OPEN_CLIP_PREFIX) for name in names):
        found = "sd2"
    elif found is None:
        raise InputError(f"{path} holds a UNet but no text encoder (no cond_stage_model.* tensors). ProtoBooth needs a "
                         "full checkpoint with UNet, VAE and text encoder.")
    if not any(name.startswith(VAE_PREFIX) for name in names):
        raise InputError(f"{path} has no VAE (first_stage_model.* tensors). Use a checkpoint with its VAE baked in.")
    proj_in = next((shape for name, shape in shapes.items() if _PROJ_IN.fullmatch(name)), None)
    if proj_in is None:
        raise InputError(f"{path} has a UNet without attention layers; {NOT_STANDARD}.")
    if (len(proj_in) == 2) != (found != "sd1"):  # SD1 alone has 1x1-convolution projections
        raise InputError(f"{path} mixes parts of different models ({'linear' if len(proj_in) == 2 else 'convolution'} "
                         f"UNet projections with the text encoder of {family(found).label}); {NOT_STANDARD}.")
    return found


def _sdxl_text_encoders(names, path) -> str:
    """'sdxl' when a file with conditioner.embedders.* text encoders has SDXL base's two; InputError otherwise."""
    def holds(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    if holds(REFINER_BIG_G_PREFIX) and not holds(BIG_G_PREFIX):
        raise not_supported(path, "SDXL refiner")
    if not (holds(SDXL_CLIP_L_PREFIX) and holds(BIG_G_PREFIX)):
        raise InputError(f"{path} has SDXL-style text encoders ({SDXL_PREFIX}*) but not SDXL's pair (CLIP-L under "
                         f"{SDXL_CLIP_L_PREFIX}*, OpenCLIP bigG under {BIG_G_PREFIX}*); {NOT_STANDARD}.")
    return "sdxl"


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
    return "it has none of the model.diffusion_model.* tensors of a Stable Diffusion checkpoint."


def prediction_type(checkpoint: CheckpointFile, family_name: str) -> str:
    """ComfyUI's v_pred marker, else the file's hints, else SD1/SDXL: epsilon; SD2: ComfyUI's LayerNorm-bias rule."""
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


def count_numbered(shapes, pattern: str) -> int:
    """How many numbered parts (pattern.format(0), (1), ...) the shapes hold, counting up from 0."""
    count = 0
    while any(name.startswith(pattern.format(count)) for name in shapes):
        count += 1
    return count


def unet_config(shapes, family_name: str, prediction: str, prefix: str = UNET_PREFIX,
                pooled_width: int | None = None) -> dict:
    """UNet2DConditionModel arguments from the shapes of an original-layout UNet (names under `prefix`).

    Transformer depths are read block by block, so reduced SDXL layouts (Segmind Vega, SSD-1B: other depths on the
    way up than down, a middle block of one resnet) are read too. An SDXL UNet's added conditioning takes the pooled
    text embedding (`pooled_width` wide, bigG's projection) and six size ids, each `addition_time_embed_dim` wide.
    """
    p = prefix
    levels = []  # per level: (channels, transformer depth of each block; 0: no attention)
    channels, depths = 0, []
    block = 1
    while True:
        where = f"{p}input_blocks.{block}."
        if where + "0.op.weight" in shapes:  # a downsampler ends a level
            levels.append((channels, depths))
            channels, depths = 0, []
        elif where + "0.in_layers.0.weight" in shapes:
            channels = shapes[where + "0.out_layers.3.weight"][0]
            depths.append(count_numbered(shapes, where + "1.transformer_blocks.{}."))
        else:
            break
        block += 1
    levels.append((channels, depths))
    blocks = {len(depths) for _, depths in levels}
    if len(blocks) != 1:
        raise InputError(f"This UNet has levels with different block counts; {NOT_STANDARD}.")
    per_level = blocks.pop()
    down = [depths for _, depths in levels]
    # Up levels, lowest resolution first as diffusers counts them, have one block more than down levels.
    up_blocks = [count_numbered(shapes, f"{p}output_blocks.{i}.1.transformer_blocks.{{}}.")
                 for i in range(len(levels) * (per_level + 1))]
    up = [up_blocks[i : i + per_level + 1] for i in range(0, len(up_blocks), per_level + 1)]
    if any(0 in depths and any(depths) for depths in down + up):
        raise InputError(f"This UNet has attention in only some blocks of a level, which diffusers cannot build; "
                         f"{NOT_STANDARD}.")
    middle_type, middle_depth = _middle_block(shapes, p)
    # diffusers builds the middle block with the last level's depth, so levels without attention carry the middle's.
    down_depths = [depths if any(depths) else [middle_depth or 1] * per_level for depths in down]
    up_depths = [depths if any(depths) else [middle_depth or 1] * (per_level + 1) for depths in up]
    if middle_depth and down_depths[-1][0] != middle_depth:
        raise InputError(f"This UNet's middle block has {middle_depth} transformer layers but its last level "
                         f"{down_depths[-1][0]}, which diffusers cannot build; {NOT_STANDARD}.")
    per_level_depth = [depths[0] for depths in down_depths]
    uniform = (all(len(set(depths)) == 1 for depths in down_depths + up_depths)
               and [depths[0] for depths in up_depths] == per_level_depth[::-1])
    channels = [channels for channels, _ in levels]
    first_attention = next(f"{p}input_blocks.{i}.1." for i in range(1, block)
                           if f"{p}input_blocks.{i}.1.proj_in.weight" in shapes)
    record = family(family_name)
    config = {
        "sample_size": record.native_size(prediction) // 8,
        "in_channels": shapes[p + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[p + "out.2.weight"][0],
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if any(depths) else "DownBlock2D" for depths in down],
        "up_block_types": ["CrossAttnUpBlock2D" if any(depths) else "UpBlock2D" for depths in up],
        "mid_block_type": middle_type,
        "transformer_layers_per_block": (per_level_depth[0] if len(set(per_level_depth)) == 1 else per_level_depth)
                                        if uniform else down_depths,
        "reverse_transformer_layers_per_block": None if uniform else up_depths,
        "cross_attention_dim": shapes[first_attention + "transformer_blocks.0.attn2.to_k.weight"][1],
        "use_linear_projection": len(shapes[first_attention + "proj_in.weight"]) == 2,
        "norm_num_groups": 32,
        # diffusers calls the number of heads attention_head_dim: SD1 has 8; SD2 and SDXL heads of 64 channels.
        "attention_head_dim": record.unet_heads or [c // record.unet_head_channels for c in channels],
    }
    if p + "label_emb.0.0.weight" in shapes:
        config.update(_size_conditioning(shapes[p + "label_emb.0.0.weight"][1], pooled_width))
    return config


def _middle_block(shapes, p: str) -> tuple[str | None, int]:
    """(diffusers' mid_block_type, transformer depth) of the middle block: resnet-attention-resnet, one resnet (SSD-1B),
    or none."""
    depth = count_numbered(shapes, p + "middle_block.1.transformer_blocks.{}.")
    if depth:
        return "UNetMidBlock2DCrossAttn", depth
    parts = count_numbered(shapes, p + "middle_block.{}.")
    if parts > 1:
        raise InputError(f"This UNet's middle block has no attention but {parts} parts, which diffusers cannot build; "
                         f"{NOT_STANDARD}.")
    return ("UNetMidBlock2D" if parts else None), 0


def _size_conditioning(in_features: int, pooled_width: int | None) -> dict:
    """SDXL's added conditioning: the pooled text embedding and six size ids, each embedded sinusoidally."""
    from .sdxl import TIME_IDS

    size_features = in_features - (pooled_width or 0)
    if pooled_width is None or size_features <= 0 or size_features % TIME_IDS:
        raise InputError(f"the UNet's added conditioning takes {in_features} values, which are not a pooled text "
                         f"embedding ({pooled_width} wide) and {TIME_IDS} size embeddings; {NOT_STANDARD}.")
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": size_features // TIME_IDS,
            "projection_class_embeddings_input_dim": in_features}


def vae_config(shapes, sample_size: int, prefix: str = VAE_PREFIX, scaling_factor: float = family("sd1").latent_scaling) -> dict:
    """AutoencoderKL arguments from the shapes of SD's KL autoencoder in the original layout (names under `prefix`)."""
    p = prefix
    levels = count_numbered(shapes, p + "encoder.down.{}.block.0.conv1.weight")
    if not levels or p + "quant_conv.weight" not in shapes or p + "encoder.mid.attn_1.q.weight" not in shapes:
        raise InputError("this VAE is not Stable Diffusion's KL autoencoder (the layout of SD1.x, SD2.x and SDXL VAEs).")
    return {
        "in_channels": shapes[p + "encoder.conv_in.weight"][1],
        "out_channels": shapes[p + "decoder.conv_out.weight"][0],
        "latent_channels": shapes[p + "decoder.conv_in.weight"][1],
        "block_out_channels": [shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        "layers_per_block": count_numbered(shapes, p + "encoder.down.0.block.{}.conv1.weight"),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "norm_num_groups": 32,
    }


# ----------------------------------------------------------------------------------- tensors, diffusers names


def unet_tensors(tensors: dict[str, torch.Tensor], config: dict, prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    """An original-layout UNet's tensors (names under `prefix`) under diffusers' names, not copied."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    named = {UNET_PREFIX + name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return converted(lambda: convert_ldm_unet_checkpoint(named, config), "UNet")


def vae_tensors(tensors: dict[str, torch.Tensor], config: dict, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """An original-layout VAE's tensors under diffusers' names; its 1x1 attention convolutions become Linear weights by
    indexing, still the same storage."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    named = {VAE_PREFIX + name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
    return converted(lambda: convert_ldm_vae_checkpoint(named, config), "VAE")


def converted(convert, part: str) -> dict[str, torch.Tensor]:
    """What a diffusers converter returns; its failures (names or shapes it cannot place) as an InputError."""
    try:
        return convert()
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(f"the {part}'s tensors do not fit the model their shapes describe ({error!r}); "
                         f"{NOT_STANDARD}.") from None
