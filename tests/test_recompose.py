"""Recomposition (engine/train/augment.py: recompose): the photo's objects cut out by their masks and set on the other
side over a filled-in background, the prompt's left and right swapped. On ShapesWorld, whose right-hand position is
the mirror of its left, a recomposed photo must be the world's own picture of the same scene on the other side."""
from __future__ import annotations

import random

import pytest
import torch

from protobooth.engine.cli import main
from protobooth.engine.errors import InputError
from protobooth.engine.models import tiny
from protobooth.engine.shapesworld import world
from protobooth.engine.train import OneShotTrainer, TrainSettings, augment

TEMPLATE = "a photo of a {} on the left, gray background"


def scene(background: str, placed) -> tuple[torch.Tensor, list[torch.Tensor]]:
    images, masks = world.render([world.Scene(background, tuple(placed))])
    return images[0], [masks[0, k] for k in range(len(placed))]


@pytest.mark.parametrize("background", ["gray", "pink"])
@pytest.mark.parametrize("instance", world.HELD_OUT[:4], ids=lambda i: f"{i.colour}-{i.shape}")
def test_a_recomposed_photo_its_masks_and_its_prompt_are_the_scene_on_the_other_side(instance, background):
    photo, masks = scene(background, [world.Placed(instance, "left")])
    truth, true_masks = scene(background, [world.Placed(instance, "right")])
    view = augment.recompose(augment.View(photo, masks), random.Random(0))
    assert torch.allclose(view.pixels, truth, atol=1e-5)  # the object moved, not mirrored; the background filled
    assert torch.allclose(view.masks[0], true_masks[0], atol=1e-5)
    assert view.prompt(TEMPLATE.format("zqobj circle")) == "a photo of a zqobj circle on the right, gray background"
    assert view.prompt("a photo of zqobj circle") == "a photo of zqobj circle"  # nothing said, nothing to swap


def test_two_objects_change_places_and_so_do_their_words():
    left, right = world.HELD_OUT[0], world.HELD_OUT[1]
    photo, masks = scene("brown", [world.Placed(left, "left"), world.Placed(right, "right")])
    truth, true_masks = scene("brown", [world.Placed(left, "right"), world.Placed(right, "left")])
    view = augment.recompose(augment.View(photo, masks), random.Random(0))
    assert torch.allclose(view.pixels, truth, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(view.masks, true_masks))
    assert view.prompt("zqa circle on the Left and zqb square on the right") == "zqa circle on the right and zqb square on the left"


def test_the_filled_background_follows_its_surroundings_and_resizing_scales_the_object():
    # a left-to-right colour ramp with a square object: the hole takes the ramp's colours, not one flat colour
    side = 64
    ramp = torch.linspace(0.1, 0.9, side)
    photo = torch.stack([ramp.expand(side, side), torch.full((side, side), 0.3), ramp.flip(0).expand(side, side)])
    mask = torch.zeros(side, side)
    mask[20:36, 8:24] = 1
    photo = photo * (1 - mask) + mask * torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    view = augment.recompose(augment.View(photo, [mask]), random.Random(0))
    hole = view.pixels[0, 20:36, 8:24]
    assert (hole - ramp[8:24]).abs().max() < 0.08  # the red channel keeps rising across the filled hole
    assert torch.equal(view.masks[0][20:36, 40:56], torch.ones(16, 16))  # mirrored: columns 8-23 → 40-55
    assert torch.allclose(view.pixels[:, 20:36, 40:56], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 16, 16))
    areas = [float(augment.recompose(augment.View(photo, [mask]), random.Random(seed), resize=0.5).masks[0].sum())
             for seed in range(6)]
    assert min(areas) < 0.85 * 256 and max(areas) > 1.15 * 256  # sizes between 50% and 150% in length


def test_training_draws_the_recomposed_photo_for_its_share_of_steps_with_the_swapped_prompt(tmp_path):
    photo, masks = scene("gray", [world.Placed(world.HELD_OUT[0], "left")])
    model = tiny.tiny_model(0)
    settings = TrainSettings.from_values(steps=1, prior_weight=0.0, flip=False, recompose=0.5, templates=(TEMPLATE,))
    with OneShotTrainer(model, photo, [m > 0.5 for m in masks], ["zqobj"], ["circle"], settings) as trainer:
        examples = [trainer._example() for _ in range(200)]
    recomposed = [e for e in examples if e.view["view"].sides_swapped]
    assert 70 < len(recomposed) < 130
    assert {e.prompt for e in recomposed} == {"a photo of a zqobj circle on the right, gray background"}
    assert {e.prompt for e in examples if not e.view["view"].sides_swapped} == {"a photo of a zqobj circle on the left, gray background"}
    # the recomposed view's latent mask sits on the right half of the latent
    mask = recomposed[0].view["masks"][0]
    assert float(mask[..., mask.shape[-1] // 2 :].sum()) > 0.9 * float(mask.sum())


def test_recomposition_settings_are_checked_and_reach_the_command_line(tmp_path, capsys):
    with pytest.raises(InputError, match="recompose"):
        TrainSettings.from_values(recompose=1.5).check()
    assert main(["train", "photo.png", "--model", "tiny", "--token", "zqobj", "--class", "circle", "--mask", "m.png",
                 "--recompose", "-0.1"]) == 2
    assert "recompose must not be negative (got -0.1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--recompose RECOMPOSE recomposition: the share of steps" in shown and "--recompose-resize" in shown
