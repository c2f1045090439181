"""Loading Stable Diffusion 1.x, 2.x and SDXL base models from diffusers folders and original single files, offline.

Diffusers folders load with `local_files_only=True`. Single files are read by single_file.py (UNet, VAE) and
single_file_text.py (text encoders): the configuration from the tensors' shapes, the tensors under diffusers' names
by diffusers' own converters.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..compat import pretrained_dtype
from ..errors import InputError
from ..fileio import error_summary
from ..text.tokenizer import END_TOKEN_ID, clip_tokenizer
from . import single_file, single_file_text
from .diffusion_model import DiffusionModel
from .families import TRAINABLE, family, noise_scheduler
from .single_file import FIX_PATH, NOT_STANDARD, PREDICTION_TYPES, CheckpointFile

# A folder's pipeline class: None when the UNet's config tells the family, else what the model is.
_FOLDER_PIPELINES = {
    "StableDiffusionPipeline": None,
    "StableDiffusionImg2ImgPipeline": None,
    "StableDiffusionXLPipeline": None,
    "StableDiffusionXLImg2ImgPipeline": None,  # SDXL base saved for img2img, or the refiner (told apart below)
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusionInpaintPipeline": "SD inpainting",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
}


def _folder_family(folder: Path) -> str:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InputError(f"{folder} is a folder but not a diffusers model (it has no model_index.json). {FIX_PATH}")
    try:
        index = json.loads(index_path.read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{folder} is not a complete diffusers model ({error}). Download it again.") from None
    pipeline = index.get("_class_name", "")
    unsupported = _FOLDER_PIPELINES[pipeline] if pipeline in _FOLDER_PIPELINES else (pipeline or "unknown")
    size_conditioned = unet.get("addition_embed_type") == "text_time"
    if size_conditioned and not (index.get("text_encoder") or [None])[0]:
        unsupported = unsupported or "SDXL refiner"  # bigG alone, as text_encoder_2
    elif size_conditioned and "EDM" in str(index.get("scheduler")):
        unsupported = unsupported or "Playground v2.5 (EDM)"  # SDXL's layout with a continuous noise schedule
    elif not size_conditioned and (unet.get("addition_embed_type") is not None or unet.get("class_embed_type") is not None):
        unsupported = unsupported or "class-conditioned"
    elif unet.get("in_channels", 4) != 4:
        unsupported = unsupported or single_file.special_unet_kind(unet["in_channels"], "SDXL" if size_conditioned else "SD")
    if unsupported:
        raise single_file.not_supported(folder, unsupported)
    if size_conditioned:
        return "sdxl"
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def detect_family(path) -> str:
    """'sd1', 'sd2' or 'sdxl' for a single-file checkpoint or diffusers folder (a .safetensors file's header or a
    folder's configs are read; a .ckpt is read whole).

    SD1 has 1x1-convolution UNet projections and the CLIP-L text encoder; SD2 has linear projections and
    OpenCLIP; SDXL both text encoders and a size-conditioned UNet. Anything else (the SDXL refiner, SD3, Flux,
    inpainting, a LoRA, ...) is an InputError that names it.
    """
    path = _existing(path)
    if path.is_dir():
        return _folder_family(path)
    return single_file.family_from_shapes(CheckpointFile(path).shapes, path)


def load_model(path, *, family: str | None = None, prediction_type: str | None = None,
               dtype: torch.dtype = torch.float32, device="cpu") -> DiffusionModel:
    """Load an SD1.x, SD2.x or SDXL model from a diffusers folder or an original single file, without network access.

    `family` ("sd1"/"sd2"/"sdxl"), when given, must match what the file is. `prediction_type` ("epsilon" or
    "v_prediction") overrides the one found; pass it for SD2 files whose kind cannot be told. Without it:
    a diffusers folder's scheduler config decides; a single file is v-prediction if it has ComfyUI's
    `v_pred` marker or ProtoBooth's metadata says so; an SD2 file without either follows ComfyUI's rule
    (the spread of one LayerNorm bias, output_blocks.11.1.transformer_blocks.0.norm1.bias, std > 0.09
    means v-prediction), which separates the official 768-px v-models from the 512-px epsilon ones but is
    a guess for fine-tunes; if that tensor does not exist, epsilon. SD1 and SDXL files without either are epsilon.
    """
    path = _existing(path)
    if family is not None and family not in TRAINABLE:
        raise InputError(f"family={family!r} is not supported; use one of {', '.join(TRAINABLE)}.")
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
        raise InputError(f"Model path {path} does not exist. {FIX_PATH}")
    return path


def _check_family(detected: str, expected: str | None, path) -> None:
    if expected is not None and expected != detected:
        raise InputError(f"{path} is an {detected.upper()} model, not {expected.upper()}. Choose family={detected!r} or "
                         "another model.")


def _load_folder(folder: Path, expected, prediction_type, dtype) -> DiffusionModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    detected = _folder_family(folder)
    _check_family(detected, expected, folder)
    # SDXL's second text encoder (bigG) has a text projection: the pooled embedding its UNet takes.
    text_parts = {"text_encoder": CLIPTextModel}
    if detected == "sdxl":
        text_parts["text_encoder_2"] = CLIPTextModelWithProjection
    missing = [part for part in ("unet", "vae", *text_parts, "scheduler") if not (folder / part).is_dir()]
    if missing:
        raise InputError(f"{folder} lacks the {', '.join(missing)} folder(s) of a diffusers {family(detected).label} "
                         "model. Download it again.")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", local_files_only=True, torch_dtype=dtype, variant=_variant(folder / "unet"))
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, torch_dtype=dtype, variant=_variant(folder / "vae"))
        encoders = [_pooling_at_end_token(_text_encoder(kind, folder / part, dtype)) for part, kind in text_parts.items()]
        schedule = dict(DDPMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
        if (folder / "tokenizer").is_dir():  # SDXL's first tokenizer: CLIP-L's, which the engine feeds both encoders
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        else:
            tokenizer = clip_tokenizer(pad_token=family(detected).pad_token)
    except Exception as error:  # a damaged, foreign or unsafe file in the folder, never a reason for a traceback
        raise InputError(f"Could not load the diffusers model in {folder} ({error_summary(error)}); download it "
                         "again, or use its .safetensors weights.") from None
    # SD never clips samples; DDPMScheduler would, if the folder's (often PNDM) config does not say.
    schedule.setdefault("clip_sample", False)
    schedule["prediction_type"] = prediction_type or schedule.get("prediction_type", "epsilon")
    if detected == "sdxl":
        from .sdxl import SDXLTextEncoder

        text_encoder = SDXLTextEncoder(*encoders)
    else:
        [text_encoder] = encoders
    return DiffusionModel(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                          noise_scheduler=DDPMScheduler.from_config(schedule), family=detected, name=folder.name)


def _text_encoder(kind, part: Path, dtype):
    """A text encoder from its folder, refusing one whose weights do not all load: transformers 4 would otherwise
    start CLIPTextModel at random from a file saved by transformers 5 (no "text_model." level in its names)."""
    encoder, info = kind.from_pretrained(part, local_files_only=True, **pretrained_dtype(dtype), variant=_variant(part),
                                         output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"{part.name} lacks {len(info['missing_keys'])} of its tensors, e.g. "
                         f"{sorted(info['missing_keys'])[0]!r} (files saved by transformers 5 need transformers 5)")
    return encoder.eval()


def _pooling_at_end_token(encoder):
    """`encoder` with its config's end token set to CLIP's. Configs saved before transformers fixed it carry
    eos_token_id 2, with which transformers pools at the largest token id, a new word's once a concept adds one; SDXL's
    diffusers pipeline gives the UNet that pooled vector. transformers also keeps a copy on the text model."""
    for module in (encoder, getattr(encoder, "text_model", None)):
        if module is not None:
            module.config.eos_token_id = END_TOKEN_ID
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = END_TOKEN_ID
    return encoder


def _variant(component: Path) -> str | None:
    """'fp16' when a component folder holds only fp16-variant weights (as some downloads do)."""
    names = [p.name for p in component.iterdir() if p.suffix in (".safetensors", ".bin")]
    return "fp16" if names and all(".fp16." in name for name in names) else None


def configs(checkpoint: CheckpointFile, family_name: str, prediction: str, use_hints: bool = True):
    """(UNet kwargs, VAE kwargs, text-encoder config) of a single file, from its shapes and, unless told not to, its
    hints. SDXL's text-encoder config is a pair (CLIP-L's, bigG's)."""
    hints = checkpoint.hints() if use_hints else {}
    shapes = checkpoint.shapes
    pooled = single_file_text.pooled_width(shapes) if family(family_name).size_conditioning else None
    unet = {**single_file.unet_config(shapes, family_name, prediction, pooled_width=pooled), **hints.get("unet", {})}
    vae = {**single_file.vae_config(shapes, sample_size=unet["sample_size"] * 8,
                                    scaling_factor=family(family_name).latent_scaling), **hints.get("vae", {})}
    return unet, vae, single_file_text.text_config(shapes, family_name, hints)


def _load_single_file(path: Path, expected, prediction_type, dtype) -> DiffusionModel:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    checkpoint = CheckpointFile(path)
    detected = single_file.family_from_shapes(checkpoint.shapes, path)
    _check_family(detected, expected, path)
    prediction_type = prediction_type or single_file.prediction_type(checkpoint, detected)
    try:
        unet_config, vae_config, text_config = configs(checkpoint, detected, prediction_type)
    except KeyError as error:
        raise InputError(f"{path} lacks tensor {error}; {NOT_STANDARD}.") from None
    # Modules without memory for their weights: the checkpoint's tensors are put in place below.
    try:
        with init_empty_weights(include_buffers=False):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
            text_encoder = single_file_text.build_text_encoder(text_config)
    except ValueError as error:
        raise InputError(f"{path}: its tensor shapes do not make a model ({error}); {NOT_STANDARD}.") from None
    parts = {
        unet: single_file.unet_tensors(checkpoint.tensors(single_file.UNET_PREFIX, dtype), unet.config),
        vae: single_file.vae_tensors(checkpoint.tensors(single_file.VAE_PREFIX, dtype), vae.config),
        text_encoder: single_file_text.text_tensors(checkpoint, detected, text_encoder, dtype),
    }
    for module, tensors in parts.items():
        _fill(module, tensors, path)
    return DiffusionModel(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                          tokenizer=clip_tokenizer(pad_token=family(detected).pad_token),
                          noise_scheduler=noise_scheduler(prediction_type), family=detected, name=path.stem)


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put the checkpoint's tensors into a module built without weights; names and shapes must match exactly."""
    expected = module.state_dict()
    if set(tensors) != set(expected):
        example = sorted(set(expected) ^ set(tensors))[0]
        raise InputError(f"{path} does not have the tensors its {type(module).__name__} needs (e.g. {example!r}); "
                         f"{NOT_STANDARD}.")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise InputError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, which does not fit "
                             f"{tuple(expected[name].shape)}; {NOT_STANDARD}.")
    module.load_state_dict(tensors, strict=True, assign=True)
