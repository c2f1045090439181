"""ComfyUI ↔ engine glue: diffusers views of a graph's MODEL/CLIP/VAE, and concepts applied the ComfyUI way.

SD1 and SD2 CLIPs hold one text encoder; SDXL's holds two (CLIP-L and OpenCLIP bigG), which become the engine's
SDXLTextEncoder: a token vector is both widths side by side, and each of ComfyUI's two word tokenizers reads its
own half, as `embedding:<name>` reads an SDXL embedding file's `clip_l` and `clip_g`.

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
from ..engine.models.families import FAMILIES, TRAINABLE, noise_scheduler
from ..engine.models.precision import compute_in
from ..engine.text.tokenizer import clip_tokenizer

log = logging.getLogger("protobooth")

# ComfyUI's model-config class → engine family. Subclasses (unCLIP, …) are other models, so names must match.
COMFY_CONFIGS = {name: record.name for record in FAMILIES.values() if record.trainable
                 for name in record.comfy_model_configs}
OTHER_MODELS = {name: what for record in FAMILIES.values() for name, what in record.comfy_other_models}
SUPPORTED = ", ".join(FAMILIES[name].label for name in TRAINABLE)


# ------------------------------------------------------------------------------------------------------
# what the MODEL is


def model_family(model) -> tuple[str, str]:
    """(family, prediction type) of a MODEL, or an InputError saying why it cannot be trained."""
    config = model.model.model_config
    name = type(config).__name__
    if name in OTHER_MODELS:
        raise InputError(f"the MODEL is {OTHER_MODELS[name]} ({name}), which ProtoBooth cannot train; use a plain "
                         f"{SUPPORTED} checkpoint.")
    found = COMFY_CONFIGS.get(name)
    if found is None:
        raise InputError(f"the MODEL is a {name} model; ProtoBooth works with {SUPPORTED} checkpoints (SD3, Flux and "
                         "others are not supported yet).")
    channels = config.unet_config.get("in_channels")
    if channels != 4:
        label = FAMILIES[found].label
        raise InputError(f"the MODEL takes {channels} input channels (an inpainting or image-edit {label} checkpoint); "
                         f"use a plain {label} checkpoint.")
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
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    pooled = None
    if FAMILIES[family_name].size_conditioning:  # ComfyUI embeds each size id embedder.dim wide; the rest is pooled text
        from ..engine.models.sdxl import TIME_IDS

        pooled = shapes["label_emb.0.0.weight"][1] - TIME_IDS * model.model.embedder.dim
    config = single_file.unet_config(shapes, family_name, prediction, prefix="", pooled_width=pooled)
    unet = _on_meta(lambda: UNet2DConditionModel(**config))
    return unet, single_file.unet_tensors(state, unet.config, prefix="")


def clip_family(clip) -> str:
    """The family whose text encoders a CLIP holds (SD1: CLIP-L; SD2: OpenCLIP-H; SDXL: CLIP-L and bigG)."""
    held = {name for name, _ in clip.cond_stage_model.named_children()}
    for name in TRAINABLE:
        if held == set(FAMILIES[name].comfy_text_encoders):
            return name
    raise InputError(f"the CLIP holds the text encoder(s) {', '.join(sorted(held)) or 'none'}, not those of a {SUPPORTED} "
                     "checkpoint; connect the CLIP of the checkpoint you use.")


def text_encoders(clip, family: str) -> list:
    """ComfyUI's text-encoder modules (SDClipModel) of a CLIP of `family`, in the order of a token vector's parts."""
    held = clip_family(clip)
    if held != family:
        raise InputError(f"the CLIP is {FAMILIES[held].label}'s text encoder but the MODEL is {FAMILIES[family].label}; "
                         "connect the CLIP from the same checkpoint as the MODEL.")
    return [getattr(clip.cond_stage_model, name) for name in FAMILIES[family].comfy_text_encoders]


def base_fingerprint(model, clip) -> str:
    """The engine's fingerprint of the base model (the same value a diffusers copy of the checkpoint has)."""
    family, prediction = model_family(model)
    _, tensors = _unet_tensors(model, family, prediction)
    return model_fingerprint(tensors, [encoder.transformer.get_input_embeddings().weight
                                       for encoder in text_encoders(clip, family)])


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


def _text_sizes(encoder) -> dict:
    """The CLIPTextConfig sizes of a ComfyUI text encoder, every stored layer, read from its tensors."""
    state = encoder.transformer.state_dict()
    prefix = "text_model.encoder.layers."
    vocab_size, width = state["text_model.embeddings.token_embedding.weight"].shape
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": state[prefix + "0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": 1 + max(int(name[len(prefix):].split(".", 1)[0]) for name in state if name.startswith(prefix)),
        "num_attention_heads": encoder.transformer.text_model.encoder.layers[0].self_attn.heads,
        "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0],
    }


def _text_view(module, encoder, device: torch.device):
    """Fill a meta-device transformers text model with a ComfyUI text encoder's tensors (computing in float32, as
    ComfyUI does whatever dtype it stores them in)."""
    state = encoder.transformer.state_dict()
    # transformers 5 leaves "text_model." out of a CLIPTextModel's names; ComfyUI and CLIPTextModelWithProjection keep it.
    tensors = {name: state[name] if name in state else state["text_model." + name] for name in module.state_dict()}
    return _view(module, tensors, device, torch.float32)


def text_encoder_view(clip, family: str, device: torch.device | None = None):
    """A transformers text model over the CLIP's text-encoder weights, giving what CLIPTextEncode gives.

    SD1/SD2: a CLIPTextModel with as many layers as the CLIP uses (CLIPSetLastLayer -2 → all but the last; SD2 → the
    penultimate), each followed by the final layer norm, as ComfyUI computes it. SDXL: the engine's SDXLTextEncoder
    over views of both encoders (sdxl_text_encoder_view). Weights stored in another dtype are cast to float32 on
    use, as ComfyUI does.
    """
    from transformers import CLIPTextModel

    encoders = text_encoders(clip, family)
    device = device or encoders[0].transformer.get_input_embeddings().weight.device
    if len(encoders) > 1:
        return sdxl_text_encoder_view(clip, encoders, device)
    sizes = {**_text_sizes(encoders[0]), "num_hidden_layers": text_encoder_layers(clip, encoders[0])}
    module = _on_meta(lambda: CLIPTextModel(FAMILIES[family].text_encoder_config(**sizes)))
    return _text_view(module, encoders[0], device)


def text_tower_view(clip, family: str, device: torch.device | None = None):
    """The CLIP text tower whose projected features live in CLIP's joint space with image features (Prototype
    Init's): the CLIP's first text encoder (SDXL: CLIP-L) as a CLIPTextModel with every layer, whatever layer the
    CLIP conditions on, since CLIP's own text features come from the last one."""
    from transformers import CLIPTextModel

    encoder = text_encoders(clip, family)[0]
    module = _on_meta(lambda: CLIPTextModel(FAMILIES[family].text_encoder_config(**_text_sizes(encoder))))
    return _text_view(module, encoder, device or encoder.transformer.get_input_embeddings().weight.device)


def sdxl_text_encoder_view(clip, encoders, device: torch.device):
    """SDXL's SDXLTextEncoder over views of ComfyUI's CLIP-L and bigG: every stored layer, since it reads their
    penultimate states itself, as ComfyUI's SDXL CLIP does; bigG's text projection is ComfyUI's (a Linear weight, the
    orientation transformers uses: ComfyUI transposes the original checkpoint's matrix when it loads it)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..engine.models.sdxl import SDXLTextEncoder, text_configs

    check_sdxl_layers(clip, encoders)
    (clip_l, clip_g), (sizes_l, sizes_g) = encoders, [_text_sizes(encoder) for encoder in encoders]
    config_l, config_g = text_configs(
        width_l=sizes_l["hidden_size"], width_g=sizes_g["hidden_size"], layers_l=sizes_l["num_hidden_layers"],
        layers_g=sizes_g["num_hidden_layers"], heads_l=sizes_l["num_attention_heads"],
        heads_g=sizes_g["num_attention_heads"], projection=clip_g.transformer.text_projection.weight.shape[0],
        intermediate_l=sizes_l["intermediate_size"], intermediate_g=sizes_g["intermediate_size"],
        vocab_size=sizes_l["vocab_size"], max_position_embeddings=sizes_l["max_position_embeddings"])
    view_l = _text_view(_on_meta(lambda: CLIPTextModel(config_l)), clip_l, device)
    view_g = _text_view(_on_meta(lambda: CLIPTextModelWithProjection(config_g)), clip_g, device)
    return SDXLTextEncoder(view_l, view_g).eval()


def check_sdxl_layers(clip, encoders) -> None:
    """SDXL's text view reads the layer SDXL conditions on (the penultimate); refuse a CLIP set to another one."""
    defaults = {encoder.options_default[1] for encoder in encoders}
    if clip.layer_idx is not None and {clip.layer_idx} != defaults:
        raise InputError(f"this CLIP conditions on layer {clip.layer_idx} (CLIPSetLastLayer); SDXL reads layer "
                         f"{'/'.join(map(str, sorted(defaults)))} of both text encoders, the only one ProtoBooth trains "
                         "through: connect the CLIP without CLIPSetLastLayer.")


def check_clip(clip, family: str) -> None:
    """Refuse, before anything loads, a CLIP that text_encoder_view cannot reproduce: another family's, or one set to
    a layer it cannot read."""
    encoders = text_encoders(clip, family)
    if len(encoders) > 1:
        check_sdxl_layers(clip, encoders)
    else:
        text_encoder_layers(clip, encoders[0])


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
        text_encoder=text_encoder_view(clip, family, device),  # SDXL: both encoders as one
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

    Each trigger word in a prompt becomes `embedding:<token>`, and the embedding lookup of each word tokenizer inside
    (SD1: clip_l; SD2: clip_h; SDXL: clip_l and clip_g) answers those names with its part of the concept's vectors
    before it looks for files, as it answers `embedding:<name>` with that key of a file. The rest is the stock
    tokenizer, so weights, `(word:1.2)` syntax and other embeddings work as usual. A second concept applied to the
    same CLIP joins the first in one wrapper (its vectors win where words clash).
    """

    def __init__(self, tokenizer, vectors: dict[str, dict[str, torch.Tensor]]):
        """`vectors`: per word tokenizer (by its attribute name), each trigger word's vectors for that encoder."""
        if isinstance(tokenizer, ConceptTokenizer):  # a chained concept: one wrapper over the stock tokenizer
            vectors = {part: {**tokenizer._vectors.get(part, {}), **words} for part, words in vectors.items()}
            tokenizer = tokenizer._stock
        self._stock = tokenizer
        self._vectors = vectors
        self._tokenizer = copy.copy(tokenizer)
        for part, part_vectors in vectors.items():
            words = copy.copy(getattr(tokenizer, part))
            words._try_get_embedding = _TriggerLookup(part_vectors, words._try_get_embedding)
            if words.embedding_directory is None:  # otherwise the tokenizer never looks embeddings up
                words.embedding_directory = []
            setattr(self._tokenizer, part, words)
        names = "|".join(re.escape(token) for token in sorted({t for words in vectors.values() for t in words}))
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
        made_for, here = FAMILIES[concept.family].label, FAMILIES[family].label
        raise InputError(f"the concept was trained on {made_for} ({concept.family}) but the MODEL is {here} ({family}); "
                         f"use the {made_for} checkpoint it was trained on, or train it again on this one.")
    encoders = text_encoders(clip, family)
    widths = [encoder.transformer.get_input_embeddings().weight.shape[1] for encoder in encoders]
    given = concept.text_widths or (concept.objects[0].vectors.shape[1],)
    if list(given) != widths:
        raise InputError(f"the concept's token vectors are {'+'.join(map(str, given))} wide but this CLIP's text "
                         f"encoder(s) read {'+'.join(map(str, widths))}; use the checkpoint the concept was trained on.")
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
    parts = FAMILIES[family].comfy_text_encoders
    vectors = {part: {} for part in parts}
    for obj in concept.objects:
        learned = obj.vectors.float()
        if strength_clip != 1:  # from the class word's vectors, each encoder's own half
            start = torch.cat([class_word_vectors(encoder.transformer, clip_tokenizer(), obj.class_word, learned.shape[0])
                               for encoder in encoders], dim=1)
            learned = start + strength_clip * (learned - start)
        for part, half in zip(parts, learned.split(widths, dim=1)):
            vectors[part][obj.token] = half.contiguous()
    clip.tokenizer = ConceptTokenizer(clip.tokenizer, vectors)
    return model, clip
