"""Loading Stable Diffusion 1.x/2.x base models from diffusers folders and original single files.

Nothing is fetched from a hub. Diffusers folders load with `local_files_only=True`. For single files,
every config that diffusers would download is built here from the tensor shapes, following the rules
the real checkpoints follow (SD1 UNet: 8 heads; SD2 UNet and both text encoders: 64-channel heads;
GroupNorm 32); files written by `engine.checkpoints.write_single_file` also carry those settings in
their metadata, which tiny test models need.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch

from .checkpoints import (
    CLIP_L_PREFIX,
    HINTS_METADATA_KEY,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    V_PREDICTION_MARKER,
    VAE_PREFIX,
    open_clip_names,
    original_names,
    unet_module_map,
    vae_module_map,
)
from .errors import InputError
from .models import SUPPORTED_FAMILIES, DiffusionModel
from .tokenizer import clip_tokenizer

log = logging.getLogger("protobooth")

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Older checkpoints keep CLIP-L under this prefix without "text_model.".
_OLD_CLIP_L_PREFIX = "cond_stage_model.transformer."
# ComfyUI's rule for SD2 checkpoints without a marker: the 768-px v-prediction releases have much more
# spread in this LayerNorm bias than the 512-px epsilon ones.
_SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_PROBE_STD = 0.09
_FOLDER_PIPELINES = {
    "StableDiffusionPipeline": None,
    "StableDiffusionImg2ImgPipeline": None,
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionXLImg2ImgPipeline": "SDXL",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusionInpaintPipeline": "SD inpainting",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
}
_PROJ_IN = re.compile(re.escape(UNET_PREFIX) + r"input_blocks\.\d+\.1\.proj_in\.weight")
_FIX_PATH = "Give a Stable Diffusion 1.x/2.x .safetensors checkpoint or a diffusers model folder (with model_index.json)."


def text_encoder_config(family: str, *, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                        num_attention_heads: int, vocab_size: int = 49408, max_position_embeddings: int = 77):
    """A CLIPTextConfig for SD1 (OpenAI CLIP-L style: quick_gelu) or SD2 (OpenCLIP style: gelu) text encoders.

    The token ids are the tokenizer's (start 49406, end 49407); SD2's tokenizer pads with "!" (id 0).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        projection_dim=hidden_size,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if family == "sd1" else 0,
    )


class CheckpointFile:
    """The tensors of a single-file checkpoint: shapes up front, tensors read one at a time."""

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
            raise InputError(f"{path} is not a model file ProtoBooth reads ({', '.join(SINGLE_FILE_SUFFIXES)}). {_FIX_PATH}")

    def tensor(self, name: str) -> torch.Tensor:
        if isinstance(self._file, dict):
            return self._file[name]
        try:
            return self._file.get_tensor(name)
        except Exception as error:
            raise InputError(f"Could not read tensor {name!r} from {self.path} ({error}). Download the file again.") from None

    def hints(self) -> dict:
        """Settings recorded by `write_single_file` (empty for files from elsewhere)."""
        try:
            return json.loads(self.metadata.get(HINTS_METADATA_KEY, "{}"))
        except json.JSONDecodeError:
            return {}


def _torch_load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(
            f"{path} can only be opened by running code stored inside it (unsafe unpickling), which ProtoBooth "
            "refuses. Use a .safetensors version of this model, or convert it with a tool you trust."
        ) from None
    except Exception as error:
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({error}). Download it again.") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # PyTorch Lightning layout, as in the original SD releases
    if not isinstance(data, dict):
        raise InputError(f"{path} holds a {type(data).__name__}, not a dictionary of model weights. {_FIX_PATH}")
    return {name: tensor for name, tensor in data.items() if isinstance(tensor, torch.Tensor)}


def _not_supported(path, family: str) -> InputError:
    return InputError(
        f"{path} is a {family} model, which ProtoBooth does not support yet (supported: Stable Diffusion 1.x and 2.x; "
        "SDXL is planned). Choose an SD1.x or SD2.x base model."
    )


def _family_from_shapes(shapes: dict[str, tuple], path) -> str:
    """'sd1' or 'sd2' for an original-layout checkpoint; InputError naming anything else."""
    names = shapes.keys()
    if any(name.endswith("double_blocks.0.img_attn.norm.key_norm.scale") for name in names):
        raise _not_supported(path, "Flux")
    if any("joint_blocks.0.context_block." in name for name in names):
        raise _not_supported(path, "Stable Diffusion 3")
    if any(name.startswith("conditioner.embedders.") for name in names):
        raise _not_supported(path, "SDXL")
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise _not_supported(path, "class-conditioned (SDXL-style or SD2 unCLIP)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise InputError(f"{path} is not a Stable Diffusion checkpoint: {_what_else(names)} {_FIX_PATH}")
    if conv_in[1] != 4:
        kind = {9: "SD inpainting", 8: "InstructPix2Pix"}.get(conv_in[1], f"{conv_in[1]}-channel")
        raise _not_supported(path, kind)

    if any(name.startswith(_OLD_CLIP_L_PREFIX) for name in names):
        family = "sd1"
    elif any(name.startswith(OPEN_CLIP_PREFIX) for name in names):
        family = "sd2"
    else:
        raise InputError(
            f"{path} holds a UNet but no text encoder (no cond_stage_model.* tensors). ProtoBooth needs a full "
            "checkpoint with UNet, VAE and text encoder."
        )
    if not any(name.startswith(VAE_PREFIX) for name in names):
        raise InputError(f"{path} has no VAE (first_stage_model.* tensors). Use a checkpoint with its VAE baked in.")
    proj_in = next((shape for name, shape in shapes.items() if _PROJ_IN.fullmatch(name)), None)
    if proj_in is None:
        raise InputError(f"{path} has a UNet without attention layers; it is not a standard SD1.x/2.x checkpoint.")
    if (len(proj_in) == 2) != (family == "sd2"):
        raise InputError(
            f"{path} mixes SD1 and SD2 parts ({'linear' if len(proj_in) == 2 else 'convolution'} UNet projections with "
            f"the {'OpenCLIP' if family == 'sd2' else 'CLIP-L'} text encoder); it is not a standard SD1.x/2.x checkpoint."
        )
    return family


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


def _folder_family(folder: Path) -> str:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InputError(
            f"{folder} is a folder but not a diffusers model (it has no model_index.json). {_FIX_PATH}"
        )
    try:
        pipeline = json.loads(index_path.read_text()).get("_class_name", "")
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{folder} is not a complete diffusers model ({error}). Download it again.") from None
    unsupported = _FOLDER_PIPELINES[pipeline] if pipeline in _FOLDER_PIPELINES else (pipeline or "unknown")
    if unet.get("addition_embed_type") is not None or unet.get("class_embed_type") is not None:
        unsupported = unsupported or "class-conditioned (SDXL-style)"
    elif unet.get("in_channels", 4) != 4:
        unsupported = unsupported or {9: "SD inpainting", 8: "InstructPix2Pix"}.get(unet["in_channels"], "non-standard")
    if unsupported:
        raise _not_supported(folder, unsupported)
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def detect_family(path) -> str:
    """'sd1' or 'sd2' for a single-file checkpoint or diffusers folder.

    SD1 has 1x1-convolution UNet projections and the CLIP-L text encoder; SD2 has linear projections and
    OpenCLIP. Anything else (SDXL, SD3, Flux, inpainting, a LoRA, ...) is an InputError that names it.
    """
    path = _existing(path)
    if path.is_dir():
        return _folder_family(path)
    return _family_from_shapes(CheckpointFile(path).shapes, path)


def load_model(path, *, family: str | None = None, prediction_type: str | None = None,
               dtype: torch.dtype = torch.float32, device="cpu") -> DiffusionModel:
    """Load an SD1.x/2.x model from a diffusers folder or an original single file, without network access.

    `family` ("sd1"/"sd2"), when given, must match what the file is. `prediction_type` ("epsilon" or
    "v_prediction") overrides the one found; pass it for SD2 files whose kind cannot be told. Without it:
    a diffusers folder's scheduler config decides; a single file is v-prediction if it has ComfyUI's
    `v_pred` marker or ProtoBooth's metadata says so; an SD2 file without either follows ComfyUI's rule
    (the spread of one LayerNorm bias, output_blocks.11.1.transformer_blocks.0.norm1.bias, std > 0.09
    means v-prediction), which separates the official 768-px v-models from the 512-px epsilon ones but is
    a guess for fine-tunes; if that tensor does not exist, epsilon. SD1 files are epsilon.
    """
    path = _existing(path)
    if family is not None and family not in SUPPORTED_FAMILIES:
        raise InputError(f"family={family!r} is not supported; use one of {', '.join(SUPPORTED_FAMILIES)}.")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(f"prediction_type={prediction_type!r} is not known; use one of {', '.join(PREDICTION_TYPES)}.")
    load = _load_folder if path.is_dir() else _load_single_file
    model = load(path, family, prediction_type, dtype)
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(device)
    return model


def _existing(path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"Model path {path} does not exist. {_FIX_PATH}")
    return path


def _check_family(detected: str, expected: str | None, path) -> None:
    if expected is not None and expected != detected:
        raise InputError(f"{path} is an {detected.upper()} model, not {expected.upper()}. Choose family={detected!r} or another model.")


# ---------------------------------------------------------------------------------------------- folders


def _load_folder(folder: Path, family, prediction_type, dtype) -> DiffusionModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    detected = _folder_family(folder)
    _check_family(detected, family, folder)
    missing = [part for part in ("unet", "vae", "text_encoder", "scheduler") if not (folder / part).is_dir()]
    if missing:
        raise InputError(f"{folder} lacks the {', '.join(missing)} folder(s) of a diffusers SD model. Download it again.")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", local_files_only=True, torch_dtype=dtype, variant=_variant(folder / "unet"))
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, torch_dtype=dtype, variant=_variant(folder / "vae"))
        text_encoder = CLIPTextModel.from_pretrained(
            folder / "text_encoder", local_files_only=True, dtype=dtype, variant=_variant(folder / "text_encoder"))
        schedule = dict(DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
        if (folder / "tokenizer").is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        else:
            tokenizer = clip_tokenizer(pad_token="<|endoftext|>" if detected == "sd1" else "!")
    except (OSError, ValueError) as error:
        raise InputError(f"Could not load the diffusers model in {folder}: {error} Download it again.") from None
    # SD never clips samples; DDPMScheduler would, if the folder's (often PNDM) config does not say.
    schedule.setdefault("clip_sample", False)
    schedule["prediction_type"] = prediction_type or schedule.get("prediction_type", "epsilon")
    return DiffusionModel(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(schedule),
        family=detected,
        name=folder.name,
    )


def _variant(component: Path) -> str | None:
    """'fp16' when a component folder holds only fp16-variant weights (as some downloads do)."""
    names = [p.name for p in component.iterdir() if p.suffix in (".safetensors", ".bin")]
    return "fp16" if names and all(".fp16." in name for name in names) else None


# ------------------------------------------------------------------------------------------ single files


def _load_single_file(path: Path, family, prediction_type, dtype) -> DiffusionModel:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tiny import noise_scheduler

    checkpoint = CheckpointFile(path)
    detected = _family_from_shapes(checkpoint.shapes, path)
    _check_family(detected, family, path)
    prediction_type = prediction_type or _single_file_prediction_type(checkpoint, detected)
    try:
        unet_config, vae_config, text_config = single_file_configs(checkpoint, detected, prediction_type)
    except KeyError as error:
        raise InputError(f"{path} lacks tensor {error}; it is incomplete or not a standard SD1.x/2.x checkpoint.") from None

    # Modules without memory for their weights: the checkpoint's tensors are put in place below.
    try:
        with init_empty_weights(include_buffers=False):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
            text_encoder = CLIPTextModel(text_config)
    except ValueError as error:
        raise InputError(f"{path}: its tensor shapes do not make a standard SD1.x/2.x model ({error}).") from None
    sources = {
        unet: _from(original_names(unet.state_dict(), unet_module_map(unet.config), UNET_PREFIX)),
        vae: _from(original_names(vae.state_dict(), vae_module_map(vae.config), VAE_PREFIX)),
        text_encoder: _text_sources(checkpoint, detected, text_encoder),
    }
    for module, module_sources in sources.items():
        _fill(module, module_sources, checkpoint, dtype)
    return DiffusionModel(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>" if detected == "sd1" else "!"),
        noise_scheduler=noise_scheduler(prediction_type),
        family=detected,
        name=path.stem,
    )


def _from(names: dict[str, str]) -> dict[str, tuple[str, int, int]]:
    """Parameter name -> (checkpoint name, part, parts): the part-th of `parts` equal slices along dim 0."""
    return {name: (original, 0, 1) for name, original in names.items()}


def _text_sources(checkpoint: CheckpointFile, family: str, text_encoder) -> dict[str, tuple[str, int, int]]:
    if family == "sd2":
        return {
            name: (original, part, len(parts))
            for original, parts in open_clip_names(text_encoder.config.num_hidden_layers).items()
            for part, name in enumerate(parts)
        }
    prefix = _clip_l_prefix(checkpoint.shapes)
    return {name: (prefix + name, 0, 1) for name in text_encoder.state_dict()}


def _clip_l_prefix(shapes) -> str:
    return CLIP_L_PREFIX if CLIP_L_PREFIX + "embeddings.token_embedding.weight" in shapes else _OLD_CLIP_L_PREFIX


def _fill(module: torch.nn.Module, sources: dict[str, tuple[str, int, int]], checkpoint: CheckpointFile, dtype) -> None:
    """Put the checkpoint's tensors into a module built without weights; names and shapes must match."""
    expected = module.state_dict()
    missing = sorted({original for name, (original, _, _) in sources.items() if original not in checkpoint.shapes})
    if missing or set(sources) != set(expected):
        example = missing[0] if missing else sorted(set(expected) ^ set(sources))[0]
        raise InputError(
            f"{checkpoint.path} does not have the tensors its {type(module).__name__} needs (e.g. {example!r}); "
            "it is incomplete or not a standard SD1.x/2.x checkpoint."
        )
    state = {}
    for name, (original, part, parts) in sources.items():
        tensor = checkpoint.tensor(original)
        if parts > 1:
            tensor = tensor.chunk(parts)[part]
        if tensor.numel() != expected[name].numel():
            raise InputError(
                f"{checkpoint.path}: tensor {original!r} has shape {tuple(tensor.shape)}, which does not fit "
                f"{tuple(expected[name].shape)}; the file is not a standard SD1.x/2.x checkpoint."
            )
        # A reshape turns the VAE's 1x1 attention convolutions into the Linear weights diffusers uses.
        state[name] = tensor.reshape(expected[name].shape).to(dtype if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(state, strict=True, assign=True)


def _single_file_prediction_type(checkpoint: CheckpointFile, family: str) -> str:
    if V_PREDICTION_MARKER in checkpoint.shapes:
        return "v_prediction"
    recorded = checkpoint.hints().get("prediction_type")
    if recorded in PREDICTION_TYPES:
        return recorded
    if family != "sd2":
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


def single_file_configs(checkpoint: CheckpointFile, family: str, prediction_type: str, use_hints: bool = True):
    """(UNet kwargs, VAE kwargs, CLIPTextConfig) for an original-layout checkpoint, from its tensor shapes.

    Settings the shapes do not show follow the rules of real SD checkpoints, unless the file's metadata
    records them (`use_hints`).
    """
    shapes = checkpoint.shapes
    hints = checkpoint.hints() if use_hints else {}
    unet = _unet_config(shapes, family, prediction_type)
    unet.update(hints.get("unet", {}))
    vae = _vae_config(shapes, sample_size=unet["sample_size"] * 8)
    vae.update(hints.get("vae", {}))
    text_sizes = _text_sizes(shapes, family)
    text_sizes.update(hints.get("text_encoder", {}))
    return unet, vae, text_encoder_config(family, **text_sizes)


def _count(shapes, pattern: str) -> int:
    count = 0
    while pattern.format(count) in shapes:
        count += 1
    return count


def _unet_config(shapes, family: str, prediction_type: str) -> dict:
    p = UNET_PREFIX
    levels = []  # per level: [blocks, channels, transformer depth (0: no attention)]
    current = [0, 0, 0]
    block = 1
    while True:
        prefix = f"{p}input_blocks.{block}."
        if prefix + "0.op.weight" in shapes:  # a downsampler ends a level
            levels.append(current)
            current = [0, 0, 0]
        elif prefix + "0.in_layers.0.weight" in shapes:
            current[0] += 1
            current[1] = shapes[prefix + "0.out_layers.3.weight"][0]
            current[2] = _count(shapes, prefix + "1.transformer_blocks.{}.norm1.weight")
        else:
            break
        block += 1
    levels.append(current)
    blocks = {level[0] for level in levels}
    if len(blocks) != 1:
        raise InputError("This checkpoint's UNet has levels with different block counts; it is not a standard SD1.x/2.x UNet.")
    channels = [level[1] for level in levels]
    attention = [level[2] > 0 for level in levels]
    middle_depth = _count(shapes, p + "middle_block.1.transformer_blocks.{}.norm1.weight")
    depths = [level[2] or middle_depth for level in levels]
    first_attention = next(f"{p}input_blocks.{i}.1." for i in range(1, block) if f"{p}input_blocks.{i}.1.proj_in.weight" in shapes)
    return {
        "sample_size": 96 if family == "sd2" and prediction_type == "v_prediction" else 64,
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
        "attention_head_dim": 8 if family == "sd1" else [c // 64 for c in channels],
    }


def _vae_config(shapes, sample_size: int) -> dict:
    p = VAE_PREFIX
    levels = _count(shapes, p + "encoder.down.{}.block.0.conv1.weight")
    return {
        "in_channels": shapes[p + "encoder.conv_in.weight"][1],
        "out_channels": shapes[p + "decoder.conv_out.weight"][0],
        "latent_channels": shapes[p + "decoder.conv_in.weight"][1],
        "block_out_channels": [shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        "layers_per_block": _count(shapes, p + "encoder.down.0.block.{}.conv1.weight"),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
        "norm_num_groups": 32,
    }


def _text_sizes(shapes, family: str) -> dict:
    if family == "sd2":
        p = OPEN_CLIP_PREFIX
        vocab_size, width = shapes[p + "token_embedding.weight"]
        sizes = {
            "num_hidden_layers": _count(shapes, p + "transformer.resblocks.{}.ln_1.weight") - 1,  # SD2 skips the last
            "intermediate_size": shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0],
            "max_position_embeddings": shapes[p + "positional_embedding"][0],
        }
    else:
        p = _clip_l_prefix(shapes)
        vocab_size, width = shapes[p + "embeddings.token_embedding.weight"]
        sizes = {
            "num_hidden_layers": _count(shapes, p + "encoder.layers.{}.mlp.fc1.weight"),
            "intermediate_size": shapes[p + "encoder.layers.0.mlp.fc1.weight"][0],
            "max_position_embeddings": shapes[p + "embeddings.position_embedding.weight"][0],
        }
    return {**sizes, "vocab_size": vocab_size, "hidden_size": width, "num_attention_heads": max(1, width // 64)}
