"""ShapesWorld's metrics, read off pictures by the two metric models (trained by train_world.py).

- Attributes: the classifier reads the background and, per side, the shape and main colour (or none).
- Fidelity: how much the object at a side is the reference instance — the cosine between the instance
  encoder's embeddings of that half of the picture and of the reference photo's object half. The
  encoder was trained so that one instance in any scene points one way and other instances (the same
  class and main colour included) point elsewhere, so it sees accents, colours and silhouette.
- Editability: whether the prompt's scene holds — the background, the object(s) at the asked side(s)
  and nothing elsewhere, and a companion object's shape and colour.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import models as sw_models
from protobooth.engine.shapesworld import world

METRIC_DIR = Path(__file__).resolve().parent / "metric"
_SHAPES, _COLOURS = list(world.CLASSES), list(world.COLOURS)


def _load(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))
    return module.eval()


def load_classifier(path: Path | None = None) -> sw_models.AttributeClassifier:
    return _load(sw_models.AttributeClassifier(), path or METRIC_DIR / "classifier.safetensors")


def load_encoder(path: Path | None = None) -> sw_models.InstanceEncoder:
    return _load(sw_models.InstanceEncoder(), path or METRIC_DIR / "encoder.safetensors")


@torch.no_grad()
def read_attributes(classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.argmax(1) for k, v in classifier(images).items()}


def scene_accuracy(classifier, images: torch.Tensor, scenes: list[world.Scene]) -> dict[str, float]:
    """Does each picture show what its caption asked? background, position, class (shape) and colour."""
    seen = read_attributes(classifier, images)
    hits = {"background": [], "position": [], "class": [], "colour": []}
    for n, scene in enumerate(scenes):
        hits["background"].append(_background_holds(seen, n, scene))
        hits["position"].append(_sides_hold(seen, n, scene))
        for placed in scene.objects:
            shape, colour = _object_holds(seen, n, placed)
            hits["class"].append(shape)
            hits["colour"].append(colour)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def _background_holds(seen: dict[str, torch.Tensor], n: int, scene: world.Scene) -> bool:
    return int(seen["background"][n]) == world.BACKGROUNDS_LIST.index(scene.background)


def _sides_hold(seen: dict[str, torch.Tensor], n: int, scene: world.Scene) -> bool:
    """Exactly the scene's sides hold an object."""
    occupied = {side for side in world.POSITIONS if int(seen[f"{side}_shape"][n]) != 0}
    return occupied == {p.position for p in scene.objects}


def _object_holds(seen: dict[str, torch.Tensor], n: int, placed: world.Placed) -> tuple[bool, bool]:
    """(right shape, right main colour) at the object's side."""
    return (int(seen[f"{placed.position}_shape"][n]) == 1 + _SHAPES.index(placed.instance.shape),
            int(seen[f"{placed.position}_colour"][n]) == 1 + _COLOURS.index(placed.instance.colour))


def editability(classifier, images: torch.Tensor, scenes: list[world.Scene], concept_sides: list[set[str]]) -> torch.Tensor:
    """Per picture, the share of the prompt's scene attributes that hold.

    Checked: the background; that exactly the asked sides hold an object; and, for every object that is
    not a learned concept (a companion named in words), its shape and main colour.
    """
    seen = read_attributes(classifier, images)
    scores = []
    for n, (scene, concepts) in enumerate(zip(scenes, concept_sides)):
        checks = [_background_holds(seen, n, scene), _sides_hold(seen, n, scene)]
        for placed in scene.objects:
            if placed.position not in concepts:
                checks.extend(_object_holds(seen, n, placed))
        scores.append(sum(checks) / len(checks))
    return torch.tensor(scores)


@torch.no_grad()
def embed(encoder, images: torch.Tensor, sides: list[str]) -> torch.Tensor:
    """Instance embeddings of the object at `sides[i]` of each picture."""
    return encoder(torch.stack([sw_models.half(image, side) for image, side in zip(images, sides)]))


def fidelity(encoder, images: torch.Tensor, sides: list[str], reference: torch.Tensor) -> torch.Tensor:
    """Cosine between each picture's object at its side and the reference embedding (clamped at 0)."""
    return (embed(encoder, images, sides) @ reference).clamp(min=0)


@dataclass
class Separation:
    same_instance: float  # mean cosine between one instance's renders in different scenes
    same_class_other_instance: float  # ... and renders of other instances of its class and main colour
    same_class_any_instance: float  # ... and renders of any other instance of its class
    worst_gap: float  # over instances: min(same) - max(other instance, same class and colour)


def validate(encoder, instances: list[world.Instance], scenes_per_instance: int = 6, seed: int = 7) -> Separation:
    """On ground-truth renders: does the same instance in other scenes score far above its look-alikes?"""
    sampler = world.SceneSampler(seed, world.all_instances(include_held_out=True))
    pool = world.all_instances(include_held_out=True)

    def renders(instance):
        scenes, sides = zip(*(sampler.featuring(instance) for _ in range(scenes_per_instance)))
        images, _ = world.render(list(scenes))
        return embed(encoder, images, sides)

    same, alike, any_class, gaps = [], [], [], []
    for instance in instances:
        own = renders(instance)
        similar = [i for i in pool if i.shape == instance.shape and i != instance]
        look_alikes = [i for i in similar if i.colour == instance.colour]
        picked = [look_alikes[k] for k in torch.randperm(len(look_alikes), generator=torch.Generator().manual_seed(seed))[:8]]
        others = torch.cat([renders(i) for i in picked])
        anyone = torch.cat([renders(similar[k]) for k in torch.randperm(len(similar), generator=torch.Generator().manual_seed(seed + 1))[:8]])
        within = own @ own.T
        off_diagonal = within[~torch.eye(len(own), dtype=torch.bool)]
        across = own @ others.T
        same.append(float(off_diagonal.mean()))
        alike.append(float(across.mean()))
        any_class.append(float((own @ anyone.T).mean()))
        gaps.append(float(off_diagonal.min() - across.max()))
    return Separation(sum(same) / len(same), sum(alike) / len(alike), sum(any_class) / len(any_class), min(gaps))
