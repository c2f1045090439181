"""ComfyUI ↔ engine glue: diffusers views of a graph's MODEL/CLIP/VAE, and concepts applied the ComfyUI way.

A *view* is a diffusers/transformers module whose parameters are ComfyUI's own tensors (the same
storage, no second copy), built on the meta device and filled with `load_state_dict(assign=True)`.
ComfyUI creates its weights under `torch.inference_mode()`, and autograd refuses to save inference
tensors for backward; a DLPack round trip made outside inference mode gives a normal tensor over the
same storage, which it accepts. The engine never writes to base weights, so training through a view
leaves ComfyUI's weights bit-identical.

Concepts go back into a graph through ComfyUI's own paths: the LoRA as kohya keys through
`comfy.sd.load_lora_for_models`, the trigger words through a per-clone tokenizer that resolves them
exactly as `embedding:<name>` resolves a file, so stock LoraLoader + `embedding:<name>` give the same
picture.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import re

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.sd

from ..engine.errors import InputError
from ..engine.models import single_file
from ..engine.models.diffusion_model import DiffusionModel, model_fingerprint
from ..engine.models.families import FAMILIES, noise_scheduler
from ..engine.models.precision import compute_in
from ..engine.text.tokenizer import clip_tokenizer

log = logging.getLogger("protobooth")

# ComfyUI's model-config class → engine family. Subclasses (unCLIP, …) are other models, so names must match.
COMFY_CONFIGS = {name: record.name for record in FAMILIES.values() if record.trainable
                 for name in record.comfy_model_configs}


# ------------------------------------------------------------------------------------------------------
# what the MODEL is


def model_family(model) -> tuple[str, str]:
    """(family, prediction type) of a MODEL, or an InputError saying why it cannot be trained."""
    config = model.model.model_config
    found = COMFY_CONFIGS.get(type(config).__name__)
    if found is None:
        raise InputError(f"the MODEL is a {type(config).__name__} model; ProtoBooth works with Stable Diffusion 1.x "
                         "and 2.x checkpoints (SDXL, SD3, Flux and others are not supported yet).")
    if config.unet_config.get("in_channels") != 4:
        raise InputError(f"the MODEL takes {config.unet_config.get('in_channels')} input channels (an inpainting or "
                         "other special checkpoint); use a plain SD1.x/SD2.x checkpoint.")
    sampling = model.object_patches.get("model_sampling", model.model.model_sampling)
    if isinstance(sampling, comfy.model_sampling.EDM) or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise InputError("the MODEL uses a continuous (EDM) noise schedule; ProtoBooth trains with SD's discrete schedule.")
    prediction = "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"
    if not _is_sd_schedule(sampling.sigmas):
        raise InputError("the MODEL's noise schedule is not Stable Diffusion's (zero terminal SNR, LCM or another "
                         "ModelSampling patch); connect the MODEL before that patch.")
    return found, prediction


def _is_sd_schedule(sigmas: torch.Tensor) -> bool:
    expected = _sd_sigmas()
    return sigmas.shape == expected.shape and torch.allclose(sigmas.float().cpu(), expected, rtol=1e-3)


@functools.lru_cache(maxsize=1)
def _sd_sigmas() -> torch.Tensor:
    alphas = noise_scheduler().alphas_cumprod.float()
    return ((1 - alphas) / alphas) ** 0.5


def _unet_tensors(model, family_name: str, prediction: str):
    """(a diffusers UNet on the meta device, its parameter names → ComfyUI's current UNet tensors, not copied)."""
    from diffusers import UNet2DConditionModel

    state = model.model.diffusion_model.state_dict()
    config = single_file.unet_config({name: tuple(t.shape) for name, t in state.items()}, family_name, prediction, prefix="")
    unet = _on_meta(lambda: UNet2DConditionModel(**config))
    return unet, single_file.unet_tensors(state, unet.config, prefix="")


def _text_encoder(clip, family: str):
    """ComfyUI's text-encoder module (SDClipModel) inside a CLIP, checked against the model family."""
    name = FAMILIES[family].comfy_text_encoder
    encoder = getattr(clip.cond_stage_model, name, None)
    if encoder is None:
        raise InputError(f"the CLIP has no {name} text encoder, so it does not belong to an {family} MODEL; "
                         "connect the CLIP from the same checkpoint as the MODEL.")
    return encoder


def base_fingerprint(model, clip) -> str:
    """The engine's fingerprint of the base model (the same value a diffusers copy of the checkpoint has)."""
    family, prediction = model_family(model)
    _, tensors = _unet_tensors(model, family, prediction)
    embedding = _text_encoder(clip, family).transformer.get_input_embeddings().weight
    return model_fingerprint(tensors, embedding)


# ------------------------------------------------------------------------------------------------------
# views


def _on_meta(build):
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers (position ids, …) made normally
        return build()


def _shared(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The same storage as a normal (non-inference) tensor; a copy only when it lives on another device."""
    if tensor.device != device:
        return tensor.detach().to(device)
    return torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(tensor.detach()))


def _view(module, tensors: dict[str, torch.Tensor], device: torch.device, compute_dtype: torch.dtype):
    """Fill a meta-device module with `tensors` (its names) without copying; frozen, in eval mode, computing in
    `compute_dtype` over weights kept in the dtype ComfyUI stores them in (engine.precision)."""
    with torch.inference_mode(False):
        module.load_state_dict({name: _shared(t, device) for name, t in tensors.items()}, strict=True, assign=True)
        module.to(device)  # moves only the buffers: the parameters are there already
        compute_in(module, compute_dtype)
    return module.eval().requires_grad_(False)


def unet_view(model, device: torch.device | None = None):
    """A diffusers UNet2DConditionModel over the MODEL's UNet weights as they are now (load it first).

    It computes in the dtype ComfyUI computes this UNet in: its manual-cast dtype where ComfyUI stores the weights
    in a dtype the device cannot compute in (fp8, or half precision on a CPU), else the stored dtype.
    """
    family, prediction = model_family(model)
    device = device or model.load_device
    unet, tensors = _unet_tensors(model, family, prediction)
    elsewhere = sorted({str(t.device) for t in tensors.values()} - {str(torch.device(device))})
    unpatched = [name for name, module in model.model.diffusion_model.named_modules()
                 if getattr(module, "weight_function", None) or getattr(module, "bias_function", None)]
    if elsewhere or unpatched:
        raise InputError(f"part of the MODEL's UNet is {'on ' + ', '.join(elsewhere) if elsewhere else 'patched on the fly'} "
                         f"rather than loaded whole on {device}: it did not fit in memory in one piece (ComfyUI's "
                         "low-VRAM mode). Free memory (fewer or smaller models in the graph) or start ComfyUI with "
                         "--normalvram, --highvram or --gpu-only.")
    if any(name.endswith(("scale_weight", "scale_input")) for name in model.model.diffusion_model.state_dict()):
        raise InputError("the MODEL's UNet is stored as scaled fp8 (an *_fp8_scaled checkpoint), which ProtoBooth cannot "
                         "train through; load an fp16 or fp32 checkpoint (plain fp8 storage, --fp8_e4m3fn-unet, works).")
    stored = next(iter(tensors.values())).dtype
    compute = model.model.manual_cast_dtype or stored
    if not compute.is_floating_point or compute.itemsize < 2:
        raise InputError(f"ComfyUI computes this MODEL's UNet in {compute}, which training cannot use (fp8 compute); "
                         "start ComfyUI without --fast / --supports-fp8-compute, or with --fp16-unet or --bf16-unet.")
    return _view(unet, tensors, device, compute)


def text_encoder_layers(clip, encoder) -> int:
    """How many transformer layers the CLIP's output comes from (CLIPSetLastLayer, SD2's penultimate layer)."""
    layer, layer_idx = encoder.options_default[:2]
    index = clip.layer_idx if clip.layer_idx is not None else (layer_idx if layer == "hidden" else None)
    total = encoder.num_layers
    if index is None or abs(index) > total:  # ComfyUI's rule for "the last layer"
        return total
    used = index + 1 if index >= 0 else total + index + 1
    if used < total and not encoder.layer_norm_hidden_state:
        raise InputError("this CLIP reads an earlier layer without the final layer norm, which ProtoBooth cannot "
                         "reproduce; connect the CLIP without CLIPSetLastLayer.")
    return used


def _stored_layers(state: dict) -> int:
    """How many transformer layers a text-encoder state dict (ComfyUI's names) holds."""
    prefix = "text_model.encoder.layers."
    return 1 + max(int(name[len(prefix):].split(".", 1)[0]) for name in state if name.startswith(prefix))


def text_encoder_view(clip, family: str, device: torch.device | None = None, all_layers: bool = False):
    """A transformers CLIPTextModel over the CLIP's text-encoder weights, giving what CLIPTextEncode gives.

    It has as many layers as the CLIP uses (CLIPSetLastLayer -2 → all but the last; SD2 → the penultimate),
    each followed by the final layer norm, as ComfyUI computes it; weights stored in another dtype are cast
    to float32 on use, as ComfyUI does. With `all_layers` it is the whole tower whatever the CLIP conditions
    on: CLIP's own text features (the ones it projects into its joint space) come from the last layer.
    """
    from transformers import CLIPTextModel

    encoder = _text_encoder(clip, family)
    state = encoder.transformer.state_dict()
    embedding = state["text_model.embeddings.token_embedding.weight"]
    config = FAMILIES[family].text_encoder_config(
        vocab_size=embedding.shape[0],
        hidden_size=embedding.shape[1],
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_stored_layers(state) if all_layers else text_encoder_layers(clip, encoder),
        num_attention_heads=encoder.transformer.text_model.encoder.layers[0].self_attn.heads,
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
    )
    module = _on_meta(lambda: CLIPTextModel(config))
    # transformers 5 names have no "text_model." prefix; ComfyUI's do.
    tensors = {name: state["text_model." + name] for name in module.state_dict()}
    return _view(module, tensors, device or embedding.device, torch.float32)


def vae_view(vae, scaling_factor: float, device: torch.device | None = None):
    """A diffusers AutoencoderKL over the VAE's weights (SD's KL autoencoder only), computing in fp32 whatever dtype
    ComfyUI keeps it in: training only encodes the photo, once, and fp32 avoids both SD's fp16-VAE overflow and
    half-precision convolutions on a CPU (200 times slower: 27 s against 0.13 s for one 64-px encode here)."""
    from diffusers import AutoencoderKL

    state = vae.first_stage_model.state_dict()
    config = single_file.vae_config({name: tuple(t.shape) for name, t in state.items()}, sample_size=512, prefix="",
                                    scaling_factor=scaling_factor)
    module = _on_meta(lambda: AutoencoderKL(**config))
    return _view(module, single_file.vae_tensors(state, module.config, prefix=""), device or vae.device, torch.float32)


def load_whole(patchers) -> None:
    """Load the models whole on their compute device, with their patches merged in, as ComfyUI's own training node
    does: every other model is unloaded first (memory_required beyond any device) and, in builds that have it,
    force_full_load stops low-VRAM mode from leaving parts of them on the CPU (unet_view refuses such a load).

    Nothing has to be handed back afterwards: the models stay loaded as after a sampler, and ComfyUI unloads them,
    in part or whole, when a later node needs the room; the memory training itself used is freed when it ends.
    """
    options = {"memory_required": 1e20}
    if "force_full_load" in inspect.signature(comfy.model_management.load_models_gpu).parameters:
        options["force_full_load"] = True
    comfy.model_management.load_models_gpu(list(patchers), **options)


def diffusion_model_view(model, clip, vae) -> DiffusionModel:
    """The graph's model as the engine's DiffusionModel: views of ComfyUI's UNet, text encoder and VAE.

    The MODEL is loaded first (ComfyUI's load_models_gpu), so its weights sit on the compute device with
    upstream LoRA patches merged in, and so does the CLIP's. Call it, and train, inside
    `torch.inference_mode(False)`. A text encoder or VAE that ComfyUI keeps on another device than the
    UNet is copied to the UNet's device (a logged exception to "no copy").
    """
    family, prediction = model_family(model)
    load_whole([model, clip.patcher, vae.patcher])
    device = torch.device(model.load_device)
    for name, patcher in (("CLIP", clip.patcher), ("VAE", vae.patcher)):
        if torch.device(patcher.load_device) != device:
            log.info("the %s runs on %s and the UNet on %s: training uses a copy of it on %s",
                     name, patcher.load_device, device, device)
    return DiffusionModel(
        unet=unet_view(model, device),
        vae=vae_view(vae, model.model.latent_format.scale_factor, device),
        text_encoder=text_encoder_view(clip, family, device),
        tokenizer=clip_tokenizer(pad_token=FAMILIES[family].pad_token),
        noise_scheduler=noise_scheduler(prediction),
        family=family,
        name=f"ComfyUI {type(model.model.model_config).__name__} model",
        _fingerprint=base_fingerprint(model, clip),
    )


# ------------------------------------------------------------------------------------------------------
# concepts into a graph


class ConceptTokenizer:
    """A CLIP tokenizer (one per CLIP clone) that reads trigger words as `embedding:` words with given vectors.

    Each trigger word in a prompt becomes `embedding:<token>`, and the inner tokenizer's embedding lookup
    answers those names with the concept's vectors before it looks for files. The rest is the stock
    tokenizer, so weights, `(word:1.2)` syntax and other embeddings work as usual. A second concept
    applied to the same CLIP joins the first in one wrapper (its vectors win where words clash).
    """

    def __init__(self, tokenizer, vectors: dict[str, torch.Tensor]):
        if isinstance(tokenizer, ConceptTokenizer):  # a chained concept: one wrapper over the stock tokenizer
            vectors = {**tokenizer._vectors, **vectors}
            tokenizer = tokenizer._stock
        self._stock = tokenizer
        self._vectors = dict(vectors)
        self._tokenizer = copy.copy(tokenizer)
        words = copy.copy(getattr(tokenizer, tokenizer.clip))
        words._try_get_embedding = _TriggerLookup(vectors, words._try_get_embedding)
        if words.embedding_directory is None:  # otherwise the tokenizer never looks embeddings up
            words.embedding_directory = []
        setattr(self._tokenizer, tokenizer.clip, words)
        names = "|".join(re.escape(token) for token in vectors)
        self._triggers = re.compile(rf"(?<![\w<>:-])({names})(?![\w<>-])", re.IGNORECASE)

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        text = self._triggers.sub(lambda m: f" embedding:{m.group(1).lower()} ", text)
        return self._tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def __getattr__(self, name):
        # Only called for names this object lacks: its own (before __init__ set them, as when copy or pickle
        # probe a bare instance) and dunders are not the inner tokenizer's to answer.
        if name.startswith("__") or name in ("_tokenizer", "_stock", "_vectors", "_triggers"):
            raise AttributeError(name)
        return getattr(self._tokenizer, name)


class _TriggerLookup:
    """Stands in for SDTokenizer._try_get_embedding: (vectors, leftover text) for trigger words, else the original."""

    def __init__(self, vectors: dict[str, torch.Tensor], original):
        self.vectors = vectors
        self.original = original

    def __call__(self, text: str):
        words = text.split()  # newer ComfyUI passes the rest of the segment too
        name = words[0] if words else text
        stripped = name.strip(",")
        if stripped.lower() not in self.vectors:
            return self.original(text)
        leftover = " ".join(part for part in (name[len(stripped):], *words[1:]) if part)
        return self.vectors[stripped.lower()], leftover


def apply_concept(model, clip, concept, strength_model: float = 1.0, strength_clip: float = 1.0):
    """(MODEL, CLIP) clones with the concept applied; the inputs are left as they are.

    strength_clip interpolates each token's vectors between its class word's embedding (0) and the
    learned vectors (1), and scales a text-encoder LoRA (TextBoost's) as stock Load LoRA's strength_clip does.
    """
    from ..engine.text.vocabulary import class_word_vectors
    from ..engine.train.methods import strength_warning

    family, _ = model_family(model)
    if concept.family != family:
        raise InputError(f"the concept was trained on an {concept.family} model but the MODEL is {family}; "
                         f"use an {concept.family} checkpoint or train the concept again on this one.")
    fingerprint = base_fingerprint(model, clip)
    if fingerprint != concept.base_fingerprint:
        log.warning("ProtoBooth: concept %s was trained on another base model (fingerprint %s, this one %s); it may look "
                    "different here.", "/".join(concept.tokens), concept.base_fingerprint, fingerprint)
    warning = strength_warning(concept, strength_model)
    if warning:
        log.warning("ProtoBooth: %s", warning)
    if concept.lora and (strength_model != 0 or strength_clip != 0):
        # Its UNet keys patch the MODEL, its text-encoder keys (TextBoost) the CLIP: what stock Load LoRA does.
        model, clip = comfy.sd.load_lora_for_models(model, clip, concept.lora, strength_model, strength_clip)
    else:
        model, clip = model.clone(), clip.clone()
    transformer = _text_encoder(clip, family).transformer
    vectors = {}
    for obj in concept.objects:
        learned = obj.vectors.float()
        if strength_clip != 1:
            start = class_word_vectors(transformer, clip_tokenizer(), obj.class_word, learned.shape[0])
            learned = start + strength_clip * (learned - start)
        vectors[obj.token] = learned
    clip.tokenizer = ConceptTokenizer(clip.tokenizer, vectors)
    return model, clip
