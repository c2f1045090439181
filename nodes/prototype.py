"""Prototype Init: start each new token where CLIP sees the object (engine.prototype, arXiv 2401.15708).

The CLIP text tower is the graph's own text encoder (a transformers view of the CLIP's weights, see
bridge), so the vectors found are in the embedding space the diffusion model reads. The image side is
ComfyUI's CLIP_VISION model; its projected image features must be as wide as the text features, which
holds for the CLIP model the checkpoint's text encoder comes from (SD1.x: CLIP ViT-L/14; SD2.x: ViT-H/14).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils

from ..engine.errors import InputError
from ..engine.prototype import ClipTowers, PrototypeSettings, prototype_embeddings
from ..engine.tokenizer import clip_tokenizer
from .bridge import TEXT_ENCODERS, TOKENIZER_PADDING, text_encoder_view
from .common import CATEGORY, node_errors, photo_objects

log = logging.getLogger("protobooth")

NODE = "Prototype Init"
FITTING_VISION = {
    "sd1": "CLIP ViT-L/14 (768-wide features; e.g. openai/clip-vit-large-patch14 saved as clip-vit-large-patch14.safetensors)",
    "sd2": "CLIP ViT-H/14 (1024-wide features; e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
}


def clip_family(clip) -> str:
    """"sd1" or "sd2" from the text encoders a CLIP holds (SD1: CLIP-L alone; SD2: OpenCLIP-H alone)."""
    held = {family for family, name in TEXT_ENCODERS.items() if hasattr(clip.cond_stage_model, name)}
    others = [name for name in ("clip_g", "t5xxl") if hasattr(clip.cond_stage_model, name)]
    if len(held) != 1 or others:
        raise InputError(f"{NODE}: this CLIP is not a Stable Diffusion 1.x/2.x text encoder (SDXL and newer models "
                         "are not supported yet); connect the CLIP of an SD1.x or SD2.x checkpoint.")
    return held.pop()


def vision_width(clip_vision) -> int:
    """Width of the CLIP_VISION model's projected image features; refuses other image encoders."""
    projection = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    weight = getattr(projection, "weight", None)
    if not callable(getattr(clip_vision, "encode_image", None)) or not isinstance(weight, torch.Tensor):
        raise InputError(f"{NODE}: clip_vision is not a CLIP image encoder with a projection into CLIP's joint "
                         f"space ({type(clip_vision).__name__}); load a CLIP vision file with Load CLIP Vision: "
                         f"for SD1.x {FITTING_VISION['sd1']}, for SD2.x {FITTING_VISION['sd2']}.")
    return weight.shape[0]


def text_projection(encoder) -> torch.nn.Linear | None:
    """A float32 copy of the text encoder's projection into CLIP's joint space; None when it is the identity.

    SD1 checkpoints leave CLIP-L's text projection out (ComfyUI then holds an identity matrix); SD2's
    OpenCLIP-H keeps it.
    """
    weight = encoder.transformer.text_projection.weight.detach().float().cpu()
    if torch.equal(weight, torch.eye(weight.shape[0], weight.shape[1])):
        log.info("%s: the checkpoint's text encoder has no text projection (SD1 checkpoints leave it out), so the "
                 "pooled text state is compared with the image features as it is.", NODE)
        return None
    projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    projection.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    return projection


@dataclass
class ComfyClipTowers(ClipTowers):
    """ClipTowers whose image side is ComfyUI's CLIP_VISION model (its own preprocessing and projection)."""

    clip_vision: object = None

    @property
    def device(self) -> torch.device:
        return self.text_model.get_input_embeddings().weight.device

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        embeds = self.clip_vision.encode_image(image.movedim(0, -1)[None].float())["image_embeds"]
        return F.normalize(embeds.float(), dim=-1)[0]


class ProtoBoothPrototypeInit:
    DESCRIPTION = (
        "Finds starting vectors for each new token: the text embedding of 'a photo of <token>' is moved towards "
        "what CLIP sees in the photo and the masked object, blended with the class word. Feed the result to "
        "Train Concept's token_init. tokens and class_words: comma-separated, one per mask, in mask order."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOBOOTH_TOKEN_INIT",)
    RETURN_NAMES = ("token_init",)
    FUNCTION = "initialise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP",),
                "clip_vision": ("CLIP_VISION",),
                "image": ("IMAGE",),
                "masks": ("MASK",),
                "tokens": ("STRING", {"default": "zqcat"}),
                "class_words": ("STRING", {"default": "cat"}),
                "vectors": ("INT", {"default": 1, "min": 1, "max": 8}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 5000}),
                "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-5, "max": 1.0, "step": 0.0005}),
            }
        }

    def initialise(self, clip, clip_vision, image, masks, tokens, class_words, vectors, steps, learning_rate):
        family = clip_family(clip)
        with node_errors(NODE):
            picture, masks, tokens, class_words = photo_objects(image, masks, tokens, class_words)
        encoder = getattr(clip.cond_stage_model, TEXT_ENCODERS[family])
        projection = text_projection(encoder)
        text_width = encoder.transformer.get_input_embeddings().weight.shape[1] if projection is None else projection.out_features
        image_width = vision_width(clip_vision)
        if image_width != text_width:
            raise InputError(f"{NODE}: the CLIP vision model gives {image_width}-wide image features but this "
                             f"{family.upper()} checkpoint's text encoder gives {text_width}-wide text features; load "
                             f"the CLIP vision file that fits it: {FITTING_VISION[family]}.")
        settings = PrototypeSettings(n_vectors=vectors, steps=steps, learning_rate=learning_rate)
        progress = comfy.utils.ProgressBar(len(tokens) * steps)
        comfy.model_management.load_models_gpu([clip.patcher])
        with torch.inference_mode(False), node_errors(NODE):
            text_model = text_encoder_view(clip, family, torch.device(clip.patcher.load_device))
            towers = ComfyClipTowers(text_model=text_model, text_projection=projection, vision_model=None,
                                     visual_projection=None, image_size=0, clip_vision=clip_vision)
            if projection is not None:
                projection.to(towers.device)
            results = prototype_embeddings(
                towers, text_model, clip_tokenizer(pad_token=TOKENIZER_PADDING[family]), picture, masks, tokens,
                class_words, settings, progress=lambda step, total: progress.update_absolute(step, total),
            )  # fmt: skip
        return (results,)


NODE_CLASS_MAPPINGS = {"ProtoBoothPrototypeInit": ProtoBoothPrototypeInit}
NODE_DISPLAY_NAME_MAPPINGS = {"ProtoBoothPrototypeInit": "Prototype Init"}
