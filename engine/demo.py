"""The built-in demo: learn one object from one picture on the embedded default model, ShapesWorld.

The reference photo is a ShapesWorld instance that the model never saw in pretraining (a red circle
with a white band across it: captions can say "red circle" but not the band). The demo learns it from
that one photo and its mask, then draws it in new scenes. `tiny_demo` is the same job on the tiny
seeded model (random weights, noise pictures): the tests use it to check the plumbing quickly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

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
    preview_seeds: tuple[int, ...] = (0,)
    render_options: dict = field(default_factory=dict)
    encoder: Path | None = None  # an object encoder for the model: its zero-shot concept is shown beside the tuned one


def shapesworld_demo(steps: int = 300) -> DemoJob:
    from .shapesworld import world
    from .prototype import PrototypeSettings
    from .shapesworld.model import GUIDANCE, OBJECT_ENCODER_FILE, SAMPLER_STEPS, clip_towers, load_shapesworld
    from .train import TrainSettings

    model = load_shapesworld()
    instance = world.HELD_OUT[0]
    image, masks = world.render([world.Scene("gray", (world.Placed(instance, "left"),))])
    word = f"zqobj {instance.shape}"
    scenes = [
        world.Scene("black", (world.Placed(instance, "right"),)),
        world.Scene("pink", (world.Placed(instance, "left"),)),
        world.Scene("brown", (world.Placed(instance, "left"), world.Placed(world.Instance("triangle", "yellow"), "right"))),
        world.Scene("gray", (world.Placed(world.Instance("star", "blue"), "left"), world.Placed(instance, "right"))),
    ]
    prompts = [scene.caption({[p.instance for p in scene.objects].index(instance): word}) for scene in scenes]
    return DemoJob(
        model=model,
        towers=clip_towers(model.text_encoder),
        image=image[0],
        masks=[(masks[0, 0] > 0.5).float()],
        tokens=["zqobj"],
        class_words=[instance.shape],
        # No mirrored views (a mirror image moves the object to the other side). LoRA lr 1e-3, not the benchmark's
        # 2e-3: nearly its fidelity (results/sweep.md: 0.58 vs 0.60) with less drift of the plain class word
        # towards the instance, which the last preview row shows.
        # Recomposition and the prototype of the object alone: on ShapesWorld's held-out instances 0-3 they lift
        # fidelity from every kind of photo tried (benchmarks/shapesworld/results/photos_probe.md). Class images of
        # "a photo of a red circle", the words the last preview row asks for: on 0-3 less drift of those words and
        # more fidelity than "a photo of a circle" (results/class_prompt_probe.md).
        settings=TrainSettings.from_values(steps=steps, lora_rank=4, flip=False, lora_learning_rate=1e-3, token_learning_rate=5e-4,
                               prior_steps=SAMPLER_STEPS, prior_guidance=GUIDANCE, recompose=0.5,
                               class_prompt=f"a photo of a {instance.colour} {{}}",
                               templates=("a photo of a {} on the left, gray background",)),
        prototype=PrototypeSettings(steps=100, weights=(0.0, 1.0, 1.0), crop_fills=(0.0, 0.5, 1.0)),
        preview_prompts=prompts + [scenes[0].caption({0: instance.words})],
        description="ShapesWorld (the embedded 32-px world model): learning a red circle with a white band, which its "
        "captions cannot describe, from one photo; the last preview row asks the trained model for a plain 'red circle' "
        "(no trigger word): how far the class drifted towards the instance",
        preview_seeds=(0, 1, 2),
        render_options={"steps": SAMPLER_STEPS, "guidance": GUIDANCE},
        encoder=OBJECT_ENCODER_FILE,
    )


def zero_shot_previews(job: DemoJob) -> tuple[list, float]:
    """The preview pictures of the concept the job's object encoder makes with no training, and the seconds it took
    to make (the encoder's forward pass alone)."""
    from .concept.concept import concept_applied
    from .encoder.encode import encode_concept
    from .encoder.model import crop_features, load_encoder
    from .generate import render

    encoder, lora, _ = load_encoder(job.encoder)
    started = time.perf_counter()
    concept = encode_concept(encoder, lora, crop_features(job.towers), job.model, job.image, job.masks, job.tokens,
                             job.class_words, source=Path(job.encoder).name)
    seconds = time.perf_counter() - started
    pipeline = job.model.pipeline()
    with concept_applied(pipeline, concept):
        return render(pipeline, job.preview_prompts, list(job.preview_seeds), **job.render_options), seconds


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
    from .models import tiny
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
        settings=TrainSettings.from_values(steps=steps, prior_images=2, prior_steps=10),
        prototype=PrototypeSettings(steps=50),
        preview_prompts=["a photo of zqdisc ball on the beach", "a photo of zqdisc ball in the snow", "a photo of a ball"],
        description="tiny seeded model with random weights: the pictures are noise; the run checks the whole job end to end",
    )
