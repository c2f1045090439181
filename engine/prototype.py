"""Prototypical embedding initialisation (arXiv 2401.15708, research/methods.md §1.3 stage A).

For each object, search token vector(s) in the base model's text-encoder input space that minimise

    L_PE = 1 − cos( T("a photo of a <tok>"), θm( I(image), I(masked object crop), T("a photo of a <class>") ) )

where I and T are a CLIP model's projected image and text features and θm is a weighted mean of the
normalised features. The CLIP text tower must read the same token-embedding space as the diffusion
model's text encoder (true for SD1 + CLIP ViT-L/14, and for ShapesWorld, whose text encoder IS its CLIP
text tower). Without a CLIP model, tokens start from their class word's embedding instead.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .compat import token_table
from .errors import InputError
from .text.templates import check_template
from .text.tokenizer import END_TOKEN_ID
from .text.vocabulary import ConceptVocabulary, class_word_vectors, eos_pooled, nearest_words, vocabulary_norm

log = logging.getLogger("protobooth")

# OpenAI CLIP's image normalisation, used by every CLIP checkpoint SD pairs with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipTowers:
    """The parts of a CLIP model the prototype step needs: both towers and their projections."""

    text_model: nn.Module  # transformers CLIP text model: input_ids → .last_hidden_state
    text_projection: nn.Module | None  # None: the pooled text state is already in the joint space
    vision_model: nn.Module  # pixel_values → .pooler_output
    visual_projection: nn.Module
    image_size: int
    eos_token_id: int = END_TOKEN_ID
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @classmethod
    def from_clip_model(cls, clip) -> "ClipTowers":
        return cls(
            text_model=clip.text_model,
            text_projection=clip.text_projection,
            vision_model=clip.vision_model,
            visual_projection=clip.visual_projection,
            image_size=clip.config.vision_config.image_size,
        )

    @property
    def device(self) -> torch.device:
        return next(self.visual_projection.parameters()).device

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """[3,H,W] 0..1 → normalised [1,3,S,S]: shorter side resized to S, centre crop."""
        height, width = image.shape[-2:]
        scale = self.image_size / min(height, width)
        size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        resized = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        crop = resized[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((crop - mean) / std).to(self.device)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=self.preprocess(image)).pooler_output
        return F.normalize(self.visual_projection(pooled).float(), dim=-1)[0]

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = eos_pooled(lambda ids: self.text_model(input_ids=ids.to(self.device)).last_hidden_state, input_ids,
                            self.eos_token_id)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return F.normalize(pooled.float(), dim=-1)


# How CLIP files keep the text projection: Hugging Face CLIPModel files as a Linear weight
# [projection width, text width]; OpenAI CLIP and open_clip files as a matrix [text width, projection
# width] that the pooled text state multiplies from the right.
TEXT_PROJECTION_KEYS = {"text_projection.weight": "Hugging Face CLIPModel", "text_projection": "OpenAI/open_clip"}


def load_text_projection(path, text_width: int, fix: str) -> torch.Tensor:
    """CLIP's text projection from a safetensors CLIP model file, as a Linear weight [projection width, text_width].

    Only that one tensor is read (the rest of a full CLIP file stays on disk). Files without it, with a
    shape that does not fit a `text_width`-wide text tower, or that are not safetensors are refused with
    an InputError that names the file and ends with `fix` (what the user should do instead).
    """
    from safetensors import SafetensorError, safe_open

    name = Path(path).name
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = [key for key in TEXT_PROJECTION_KEYS if key in handle.keys()]
            if not keys:
                raise InputError(f"{name} holds no CLIP text projection (neither 'text_projection.weight', as Hugging "
                                 "Face CLIPModel files keep it, nor 'text_projection', as OpenAI/open_clip files do), "
                                 f"so it is not a full CLIP model file; {fix}")
            key = keys[0]
            shape = list(handle.get_slice(key).get_shape())
            linear = key == "text_projection.weight"
            expected = f"[projection width, {text_width}]" if linear else f"[{text_width}, projection width]"
            if len(shape) != 2 or shape[1 if linear else 0] != text_width:
                raise InputError(f"{name} holds a {key} of shape {shape}, but this text encoder is {text_width} wide, "
                                 f"which needs {expected} ({TEXT_PROJECTION_KEYS[key]} layout): the file belongs to "
                                 f"another CLIP model; {fix}")
            projection = handle.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise InputError(f"{name} could not be read as a safetensors file ({error}); {fix}") from None
    if not projection.is_floating_point() or not torch.isfinite(projection).all():
        raise InputError(f"{name}'s {key} is not a finite floating-point matrix; {fix}")
    return (projection if linear else projection.T).float().contiguous()


@dataclass
class PrototypeSettings:
    n_vectors: int = 1
    steps: int = 200
    learning_rate: float = 5e-3
    # θm weights for (whole image, masked object crop, class prompt)
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    token_prompt: str = "a photo of a {}"
    class_prompt: str = "a photo of a {}"
    crop_padding: float = 0.1
    # The plain backgrounds the object crop is set on; the crop's feature is their mean, so that no one background
    # colour (mid-grey reads as "gray background") goes into the token with the object.
    crop_fills: tuple = (0.5,)

    def check(self) -> None:
        """Refuse settings the search cannot run with, before it starts."""
        for name, value in (("vectors per token", self.n_vectors), ("prototype steps", self.steps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise InputError(f"{name} must be a whole number of at least 1 (got {value!r}).")
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise InputError(f"prototype learning rate must be above 0 (got {self.learning_rate!r}).")
        weights = tuple(self.weights) if isinstance(self.weights, (list, tuple)) else ()
        if len(weights) != 3 or not all(_finite(w) and w >= 0 for w in weights) or not any(weights):
            raise InputError(f"prototype weights must be three numbers, none negative and not all 0, for (whole image, "
                             f"masked object, class prompt) (got {self.weights!r}).")
        if not _finite(self.crop_padding) or self.crop_padding < 0:
            raise InputError(f"crop padding must not be negative (got {self.crop_padding!r}).")
        fills = list(self.crop_fills) if isinstance(self.crop_fills, (list, tuple)) else []
        if not fills or not all(_fill_ok(fill) for fill in fills):
            raise InputError(f"crop fills must be one or more grey levels or RGB triples between 0 and 1 (got "
                             f"{self.crop_fills!r}).")
        check_template(self.token_prompt, "token prompt", "the token")
        check_template(self.class_prompt, "class prompt", "the class word")


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _fill_ok(fill) -> bool:
    levels = list(fill) if isinstance(fill, (list, tuple)) else [fill]
    return len(levels) in (1, 3) and all(_finite(v) and 0 <= v <= 1 for v in levels)


@dataclass
class Prototype:
    """Initial vectors for one token, with what the search found."""

    token: str
    class_word: str
    vectors: torch.Tensor  # [n_vectors, dim]
    method: str  # "prototype" or "class-word"
    cosine_start: float | None = None
    cosine_final: float | None = None
    nearest: list[str] = field(default_factory=list)


def masked_object_crop(image: torch.Tensor, mask: torch.Tensor, padding: float = 0.1, fill=0.5) -> torch.Tensor:
    """The object on a plain background (`fill`: a grey level or an RGB triple; mid-grey by default), cropped to a
    square around the mask's bounding box plus padding."""
    fill = torch.as_tensor(fill, dtype=image.dtype).reshape(-1, 1, 1)
    isolated = image * mask + fill * (1 - mask)
    rows = torch.nonzero(mask.amax(dim=1) > 0.5).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0.5).flatten()
    if rows.numel() == 0:
        rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
        cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left) * (1 + 2 * padding)
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    height, width = mask.shape
    side = min(side, max(height, width))
    y0 = int(max(0, min(height - min(side, height), round(centre_y - side / 2))))
    x0 = int(max(0, min(width - min(side, width), round(centre_x - side / 2))))
    return isolated[:, y0 : y0 + int(min(side, height)), x0 : x0 + int(min(side, width))]


def class_word_prototype(text_encoder, tokenizer, token: str, class_word: str, n_vectors: int = 1) -> Prototype:
    vectors = class_word_vectors(text_encoder, tokenizer, class_word, n_vectors)
    return Prototype(token, class_word, vectors, "class-word", nearest=nearest_words(text_encoder, tokenizer, vectors[0]))


def prototype_embeddings(
    towers: ClipTowers | None | list[ClipTowers | None],
    text_encoder,
    tokenizer,
    image: torch.Tensor,
    masks: list[torch.Tensor],
    tokens: list[str],
    class_words: list[str],
    settings: PrototypeSettings | None = None,
    progress=None,
) -> list[Prototype]:
    """One Prototype per object. `progress(step, total)` is called every optimisation step.

    A text encoder of several parts (SDXL's CLIP-L and bigG) takes one towers entry per part, or one for the first:
    each part with towers is searched, the others start from the class word, and the parts' vectors are joined."""
    parts = list(getattr(text_encoder, "parts", {}).values())
    if parts:
        per_part = list(towers) if isinstance(towers, (list, tuple)) else [towers]
        per_part += [None] * (len(parts) - len(per_part))
        if all(part_towers is None for part_towers in per_part):
            log.warning("No CLIP model given: tokens start from their class words' embeddings (no prototype search).")
        n_vectors = (settings or PrototypeSettings()).n_vectors
        found = [prototype_embeddings(part_towers, part, tokenizer, image, masks, tokens, class_words, settings, progress)
                 if part_towers is not None else
                 [class_word_prototype(part, tokenizer, t, c, n_vectors) for t, c in zip(tokens, class_words)]
                 for part_towers, part in zip(per_part, parts)]
        # Per object, its parts' vectors side by side; what the search found is told by the first part's record.
        return [dataclasses.replace(own[0], vectors=torch.cat([p.vectors for p in own], dim=1)) for own in zip(*found)]
    settings = settings or PrototypeSettings()
    settings.check()
    if towers is None:
        log.warning("No CLIP model given: tokens start from their class words' embeddings (no prototype search).")
        return [class_word_prototype(text_encoder, tokenizer, t, c, settings.n_vectors) for t, c in zip(tokens, class_words)]
    width = text_encoder.get_input_embeddings().weight.shape[1]
    clip_width = token_table(towers.text_model).weight.shape[1]
    if clip_width != width:
        raise InputError(
            f"the CLIP model's text tower reads {clip_width}-wide token vectors but the diffusion model's text encoder "
            f"reads {width}-wide ones; use the CLIP model that matches the base model (CLIP ViT-L/14 for SD1.x, "
            "ViT-H/14 for SD2.x; SDXL: ViT-L/14, and OpenCLIP ViT-bigG/14 for its second text encoder)."
        )
    results = []
    total = len(tokens) * settings.steps
    for index, (token, class_word, mask) in enumerate(zip(tokens, class_words, masks)):
        def report(step, offset=index * settings.steps):
            if progress is not None:
                progress(offset + step, total)

        results.append(_search(towers, text_encoder, tokenizer, image, mask, token, class_word, settings, report))
    return results


def _search(towers, text_encoder, tokenizer, image, mask, token, class_word, settings, report) -> Prototype:
    start = class_word_vectors(text_encoder, tokenizer, class_word, settings.n_vectors)
    vocabulary = ConceptVocabulary(tokenizer, [token], [start])
    prompt_ids = vocabulary.input_ids([settings.token_prompt.format(token)])
    bare_ids = vocabulary.input_ids([token])
    with torch.no_grad():
        class_ids = vocabulary.input_ids([settings.class_prompt.format(class_word)])
        crops = [towers.image_features(masked_object_crop(image, mask, settings.crop_padding, fill))
                 for fill in settings.crop_fills]
        features = [
            towers.image_features(image),
            crops[0] if len(crops) == 1 else F.normalize(torch.stack(crops).mean(0), dim=0),
            towers.text_features(class_ids)[0],
        ]
        weights = torch.tensor(settings.weights, dtype=torch.float32)
        target = F.normalize((weights[:, None] * torch.stack(features).cpu()).sum(0), dim=0).to(towers.device)
    bound = max(vocabulary_norm(text_encoder), float(start.norm(dim=1).max()))
    optimizer = torch.optim.Adam(vocabulary.vectors.parameters(), lr=settings.learning_rate)
    frozen = [p.requires_grad for p in towers.text_model.parameters()]
    towers.text_model.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad(), vocabulary.installed(towers.text_model):
            vocabulary.vectors.to(towers.device)
            with torch.no_grad():
                cosine_start = float(F.cosine_similarity(towers.text_features(prompt_ids)[0], target, dim=0))
            for step in range(1, settings.steps + 1):
                loss = 1 - F.cosine_similarity(towers.text_features(prompt_ids)[0], target, dim=0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                vocabulary.clamp_norms([bound])
                report(step)
            with torch.no_grad():
                cosine_final = float(F.cosine_similarity(towers.text_features(prompt_ids)[0], target, dim=0))
                cosine_bare = float(F.cosine_similarity(towers.text_features(bare_ids)[0], target, dim=0))
    finally:
        for parameter, flag in zip(towers.text_model.parameters(), frozen):
            parameter.requires_grad_(flag)
    vectors = vocabulary.vectors[0].detach().cpu().clone()
    nearest = nearest_words(text_encoder, tokenizer, vectors[0])
    log.info(
        "prototype for %r (%s): cosine %.3f → %.3f (bare token %.3f); nearest words: %s",
        token, class_word, cosine_start, cosine_final, cosine_bare, ", ".join(nearest),
    )
    return Prototype(token, class_word, vectors, "prototype", cosine_start, cosine_final, nearest)


def load_clip_towers(path: str, device, flag: str = "--clip"):
    """ClipTowers from a transformers CLIPModel folder (the CLI's --clip or --clip-g)."""
    from transformers import CLIPModel

    from .fileio import error_summary

    try:
        clip = CLIPModel.from_pretrained(path, local_files_only=True)
    except Exception as error:  # a damaged, foreign or unsafe file in the folder
        raise InputError(f"{flag} {path} could not be loaded as a CLIP model ({error_summary(error)}); give the folder "
                         "of a transformers CLIPModel with .safetensors weights.") from None
    return ClipTowers.from_clip_model(clip.to(device).eval())
