"""The built-in demo: learn one object from one picture on the embedded default model.

Until the ShapesWorld model ships, the default model is the tiny seeded model: random weights, so the
pictures are noise. The demo then shows that the whole job runs end to end (prototype search, training,
concept files, loss curve, preview grid), not what the pictures look like.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DemoJob:
    model: object
    towers: object
    image: torch.Tensor
    masks: list
    tokens: list[str]
    class_words: list[str]
    settings: object
    prototype: object
    preview_prompts: list[str]
    description: str


def _disc_scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-tone disc on a grey-blue background, and its mask."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (((ys - size * 0.55) ** 2 + (xs - size * 0.4) ** 2) < (size * 0.27) ** 2).float()
    image = torch.empty(3, size, size)
    image[:] = torch.tensor([0.45, 0.5, 0.6])[:, None, None]
    top = (ys < size * 0.55).float() * mask
    image = image * (1 - mask) + mask * torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    image = image * (1 - top) + top * torch.tensor([0.95, 0.85, 0.1])[:, None, None]
    return image, mask


def tiny_demo(steps: int = 60) -> DemoJob:
    from . import tiny
    from .prototype import ClipTowers, PrototypeSettings
    from .train import TrainSettings

    model = tiny.tiny_model(0)
    image, mask = _disc_scene()
    return DemoJob(
        model=model,
        towers=ClipTowers.from_clip_model(tiny.tiny_clip(model.text_encoder)),
        image=image,
        masks=[mask],
        tokens=["zqdisc"],
        class_words=["ball"],
        settings=TrainSettings(steps=steps, prior_images=2, prior_steps=10),
        prototype=PrototypeSettings(steps=50),
        preview_prompts=["a photo of zqdisc ball on the beach", "a photo of zqdisc ball in the snow", "a photo of a ball"],
        description="tiny seeded model with random weights (ShapesWorld is not shipped yet): the pictures are noise; "
        "the run shows the whole job working end to end",
    )
