"""Drawing pictures with a model, with or without a concept applied."""
from __future__ import annotations

import logging
import math

import torch

from .concept.concept import Concept, concept_applied
from .errors import InputError
from .train.methods import strength_warning

log = logging.getLogger("protobooth")


def check_render_options(steps: int = 25, guidance: float = 7.5, size: int | None = None, seeds=(0,),
                         lora_scale: float = 1.0, prompts=("",)) -> None:
    """Sampling settings a user typed, refused with the fix before any model loads."""
    if not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InputError(f"steps {steps} must be a whole number from 1 to 1000 (25 is usual).")
    for label, value in (("guidance", guidance), ("LoRA scale", lora_scale)):
        if not math.isfinite(value) or abs(value) > 100:
            raise InputError(f"{label} {value} must be a number between -100 and 100 (guidance 7.5 and scale 1 are usual).")
    if size is not None and (size < 64 or size > 4096 or size % 8):
        raise InputError(f"size {size} must be a multiple of 8 from 64 to 4096 (the model's native size is usual).")
    bad = [seed for seed in seeds if not 0 <= seed < 2**63]
    if bad:
        raise InputError(f"seed {bad[0]} must be a whole number from 0 to 2**63-1.")
    if not prompts:
        raise InputError("no prompt given; give at least one.")


def render(pipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5, size: int | None = None,
           negative_prompt: str | None = None, progress=None) -> list:
    """One PIL image per (prompt, seed), prompts outer. Each image's noise comes from its own seed."""
    check_render_options(steps, guidance, size, seeds, prompts=prompts)
    size = size or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    pipeline.set_progress_bar_config(disable=True)
    images, total = [], len(prompts) * len(seeds)
    for prompt in prompts:
        for seed in seeds:
            with torch.no_grad():
                out = pipeline(prompt, negative_prompt=negative_prompt, height=size, width=size, num_inference_steps=steps,
                               guidance_scale=guidance, generator=torch.Generator().manual_seed(seed))
            images.extend(out.images)
            if progress is not None:
                progress(len(images), total)
    return images


def check_concept_family(concept: Concept, model_family: str, model: str = "this") -> None:
    """Refuse a concept of another model family than `model`'s (what the message calls the model)."""
    if concept.family != model_family:
        raise InputError(f"the concept was trained on an {concept.family.upper()} model but {model} is an "
                         f"{model_family.upper()} model; use a base model of the same family.")


def check_concept_fits(model, concept: Concept) -> None:
    """Refuse a concept of another model family; warn when it was trained on a different base model."""
    check_concept_family(concept, model.family)
    widths = model.text_widths
    wrong = [obj.token for obj in concept.objects if obj.vectors.shape[1] != sum(widths)]
    if wrong or (len(widths) > 1 and tuple(concept.text_widths) != widths):
        given = "+".join(map(str, concept.text_widths)) if concept.text_widths else concept.objects[0].vectors.shape[1]
        takes = f"text encoders take {'+'.join(map(str, widths))}" if len(widths) > 1 else f"text encoder takes {widths[0]}"
        raise InputError(f"the concept's vectors for {(wrong or concept.tokens)[0]!r} are {given} wide but this model's "
                         f"{takes}; the concept belongs to another model: use that one.")
    if concept.base_fingerprint != model.fingerprint:
        log.warning("the concept was trained on another base model (fingerprint %s, this one %s); it may look different.",
                    concept.base_fingerprint, model.fingerprint)


def generate(model, prompts: list[str], concept: Concept | None = None, seeds=(0,), lora_scale: float = 1.0, **kwargs) -> list:
    """Pictures from `model`, with `concept` applied through the stock diffusers loaders when given."""
    check_render_options(**{k: v for k, v in kwargs.items() if k in ("steps", "guidance", "size")}, seeds=list(seeds),
                         lora_scale=lora_scale, prompts=prompts)
    pipeline = model.pipeline()
    if concept is None:
        return render(pipeline, prompts, list(seeds), **kwargs)
    check_concept_fits(model, concept)
    warning = strength_warning(concept, lora_scale)
    if warning:
        log.warning(warning)
    with concept_applied(pipeline, concept, lora_scale):
        return render(pipeline, prompts, list(seeds), **kwargs)
