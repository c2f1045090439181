"""Where pretraining samples come from. A source has `sample(seed, general) → Sample`: an identity sample (two
pictures of one object: the reference and the one to denoise) or, when `general`, an ordinary captioned picture."""
from __future__ import annotations

from ..shapesworld import world
from .pretrain import Sample


class ShapesWorldPairs:
    """ShapesWorld's pretraining instances (the benchmark's held-out ones never appear): the reference shows the
    instance alone on a random side and background; the target shows it in another random scene (half the time
    beside a companion), captioned with the trigger word in place of its colour."""

    def __init__(self):
        self.instances = world.all_instances()  # without the held-out instances

    def sample(self, seed: int, general: bool) -> Sample:
        sampler = world.SceneSampler(seed, self.instances)
        if general:
            scene = sampler.scene()
            images, _ = world.render([scene])
            return Sample(target=images[0], caption=scene.caption())
        instance = sampler.instance()
        reference = world.Scene(world.BACKGROUNDS_LIST[int(sampler.rng.integers(len(world.BACKGROUNDS_LIST)))],
                                (sampler.placed(instance, world.POSITIONS[int(sampler.rng.integers(2))]),))
        target, _ = sampler.featuring(instance)
        images, masks = world.render([reference, target])
        caption = target.caption({0: "{token} " + instance.shape})
        return Sample(target=images[1], caption=caption, class_word=instance.shape, reference=images[0],
                      reference_mask=masks[0, 0], target_mask=masks[1, 0])
