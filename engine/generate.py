"""Drawing pictures with a model, with or without a concept applied."""
from __future__ import annotations

import logging

import torch

from .concept.concept import Concept, concept_applied
from .errors import InputError

log = logging.getLogger("protobooth")


def render(pipeline, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5, size: int | None = None,
           negative_prompt: str | None = None, progress=None) -> list:
    """One PIL image per (prompt, seed), prompts outer. Each image's noise comes from its own seed."""
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


def check_concept_fits(model, concept: Concept) -> None:
    """Refuse a concept of another model family; warn when it was trained on a different base model."""
    if concept.family != model.family:
        raise InputError(f"the concept was trained on an {concept.family.upper()} model but this is an "
                         f"{model.family.upper()} model; use a base model of the same family.")
    if concept.base_fingerprint != model.fingerprint:
        log.warning("the concept was trained on another base model (fingerprint %s, this one %s); it may look different.",
                    concept.base_fingerprint, model.fingerprint)


def generate(model, prompts: list[str], concept: Concept | None = None, seeds=(0,), lora_scale: float = 1.0, **kwargs) -> list:
    """Pictures from `model`, with `concept` applied through the stock diffusers loaders when given."""
    pipeline = model.pipeline()
    if concept is None:
        return render(pipeline, prompts, list(seeds), **kwargs)
    check_concept_fits(model, concept)
    with concept_applied(pipeline, concept, lora_scale):
        return render(pipeline, prompts, list(seeds), **kwargs)
