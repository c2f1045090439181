"""A concept in one forward pass: each object's masked crop through the CLIP vision tower and the object encoder."""
from __future__ import annotations

import torch

from ..concept.concept import Concept, ConceptObject
from ..errors import InputError
from ..prototype import masked_object_crop
from ..text.vocabulary import class_word_vectors
from .model import ObjectEncoder

CROP_PADDING = 0.1  # as the prototype step crops the object


def check_encoder_fits(encoder: ObjectEncoder, family: str, text_width: int, vision_width: int, source: str) -> None:
    """Refuse, with the fix, an encoder pretrained for another family, text width or CLIP vision tower."""
    shape = encoder.shape
    if family != shape.family or text_width != shape.text_width:
        raise InputError(f"{source} was pretrained for {shape.family.upper()} ({shape.text_width}-wide token vectors) and "
                         f"this model is {family.upper()} ({text_width}-wide); use an encoder pretrained on this "
                         "model's family (protobooth pretrain-encoder --model ...).")
    if vision_width != shape.vision_width:
        raise InputError(f"{source} reads {shape.vision_width}-wide CLIP vision features but this CLIP vision tower "
                         f"gives {vision_width}-wide ones; use the CLIP vision model it was pretrained with.")


def object_vectors(encoder: ObjectEncoder, features_of, text_encoder, tokenizer, image: torch.Tensor,
                   masks: list[torch.Tensor], class_words: list[str]) -> list[torch.Tensor]:
    """Each object's K vectors. `features_of(crop [3,h,w] in 0..1) → [1, N, vision width]` runs the vision tower
    (transformers' in the library, ComfyUI's CLIP_VISION in a graph)."""
    vectors = []
    with torch.no_grad():
        for mask, class_word in zip(masks, class_words):
            features = features_of(masked_object_crop(image, mask, CROP_PADDING))
            start = class_word_vectors(text_encoder, tokenizer, class_word, encoder.shape.queries)[None]
            vectors.append(encoder(features.to(encoder.out.weight.device), start.to(encoder.out.weight.device))[0].cpu())
    return vectors


def encoder_concept(encoder: ObjectEncoder, lora: dict, vectors: list[torch.Tensor], tokens: list[str],
                    class_words: list[str], family: str, fingerprint: str, widths: tuple[int, ...], source: str) -> Concept:
    """The Concept of the encoder's vectors for the objects, with the UNet LoRA pretrained with it."""
    objects = [ConceptObject(t, c, v.float()) for t, c, v in zip(tokens, class_words, vectors)]
    settings = {"method": {"name": "encoder", "source": str(source), "queries": encoder.shape.queries}}
    return Concept(objects, dict(lora), family, fingerprint, settings, text_widths=widths if len(widths) > 1 else ())


def encode_concept(encoder: ObjectEncoder, lora: dict, features_of, model, image: torch.Tensor,
                   masks: list[torch.Tensor], tokens: list[str], class_words: list[str], source: str = "the encoder") -> Concept:
    """The Concept the encoder makes of the photo's objects for `model` (a DiffusionModel)."""
    vectors = object_vectors(encoder, features_of, model.text_encoder, model.tokenizer, image, masks, class_words)
    return encoder_concept(encoder, lora, vectors, tokens, class_words, model.family, model.fingerprint,
                           model.text_widths, source)
