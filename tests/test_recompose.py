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
    assert view.prompt(TEMPLATE, "zqobj circle") == "a photo of a zqobj circle on the right, gray background"
    assert view.prompt("a photo of {}", "zqobj circle") == "a photo of zqobj circle"  # nothing said, nothing to swap


def test_two_objects_change_places_and_so_do_their_words():
    left, right = world.HELD_OUT[0], world.HELD_OUT[1]
    photo, masks = scene("brown", [world.Placed(left, "left"), world.Placed(right, "right")])
    truth, true_masks = scene("brown", [world.Placed(left, "right"), world.Placed(right, "left")])
    view = augment.recompose(augment.View(photo, masks), random.Random(0))
    assert torch.allclose(view.pixels, truth, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(view.masks, true_masks))
    assert view.prompt("{} on the Left and zqb square on the right", "zqa circle") == "zqa circle on the right and zqb square on the left"


@pytest.mark.parametrize("side", world.POSITIONS)
@pytest.mark.parametrize("instance", world.HELD_OUT[:4], ids=lambda i: f"{i.colour}-{i.shape}")
def test_beside_a_copy_the_photo_mask_and_prompt_are_the_scene_of_the_object_twice(instance, side):
    photo, masks = scene("pink", [world.Placed(instance, side)])
    truth, true_masks = scene("pink", [world.Placed(instance, "left"), world.Placed(instance, "right")])
    view = augment.beside_a_copy(augment.View(photo, masks), random.Random(0))
    assert torch.allclose(view.pixels, truth, atol=1e-5)  # where it stood, and its copy on the other side
    assert torch.allclose(view.masks[0], torch.maximum(*true_masks), atol=1e-5)  # one mask: the same words name both
    assert view.prompt(TEMPLATE, "zqobj circle") == "a photo of a zqobj circle on the left and a zqobj circle on the right, gray background"
    assert view.prompt("a photo of {}", "zqobj circle") == "a photo of zqobj circle and a zqobj circle"


def test_beside_a_copy_a_centred_or_wide_object_is_pushed_apart_and_shrunk_to_fit():
    side = 64
    photo = torch.full((3, side, side), 0.5)
    mask = torch.zeros(side, side)
    mask[24:40, 20:44] = 1  # 24 px wide, in the middle: its mirror image is itself
    photo = photo * (1 - mask) + mask * torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    view = augment.beside_a_copy(augment.View(photo, [mask]), random.Random(0))
    columns = view.masks[0].amax(0) > 0.5
    assert columns[8:56].all() and not columns[:8].any() and not columns[56:].any()  # two, touching in the middle
    assert float(view.masks[0].sum()) == 2 * float(mask.sum())  # whole, not overlapping
    assert torch.equal(view.pixels[:, 24:40, 8:56], photo[:, 24:40, 20:44].repeat(1, 1, 2))
    wide = torch.zeros(side, side)
    wide[24:40, 4:60] = 1  # wider than half the picture: both copies shrink to fit
    view = augment.beside_a_copy(augment.View(photo * (1 - wide) + wide, [wide]), random.Random(0))
    halves = view.masks[0][:, :32].sum(), view.masks[0][:, 32:].sum()
    expected = float(wide.sum()) * (32 / 56) ** 2  # each copy's area at the scale that fits it in its half
    assert all(abs(float(h) - expected) < 0.1 * expected for h in halves) and float(view.masks[0].max()) <= 1
    with pytest.raises(ValueError, match="one object"):
        augment.beside_a_copy(augment.View(photo, [mask, mask]), random.Random(0))


def test_beside_another_the_photo_mask_and_prompt_are_the_scene_with_the_other_object_where_it_stood():
    learned, other = world.HELD_OUT[0], world.Instance("circle", "green")
    photo, masks = scene("gray", [world.Placed(learned, "left")])
    picture, picture_masks = scene("pink", [world.Placed(other, "right")])  # a class picture: its own place, background
    companion_mask = augment.object_by_background(picture)
    cover = picture_masks[0]  # the plain background cut away: all of the object but its faintest edge, nothing else
    assert bool((companion_mask[cover > 0.5] == 1).all()) and bool((companion_mask[cover == 0] == 0).all())
    truth, true_masks = scene("gray", [world.Placed(other, "left"), world.Placed(learned, "right")])
    view = augment.beside_another(augment.View(photo, masks), augment.View(picture, [companion_mask]), "green circle",
                                  random.Random(0))
    inside = true_masks[0] > 0.99  # the cut is hard-edged: its rim pixels keep some pink, so compare inside only
    assert torch.allclose(view.pixels[:, inside], truth[:, inside], atol=1e-4)
    assert torch.allclose(view.masks[0], true_masks[1], atol=1e-5)
    assert bool((view.companion_mask[true_masks[0] > 0.5] == 1).all()) and bool((view.companion_mask[true_masks[0] == 0] == 0).all())
    assert view.prompt(TEMPLATE, "zqobj circle") == "a photo of a zqobj circle on the right and a green circle on the left, gray background"
    assert view.prompt("a photo of {}", "zqobj circle") == "a photo of zqobj circle and a green circle"
    # kept in place, the other object on the mirrored place: the photo's own side is not "alone" either
    kept = augment.beside_another(augment.View(photo, masks), augment.View(picture, [companion_mask]), "green circle",
                                  random.Random(0), move=False)
    truth, true_masks = scene("gray", [world.Placed(learned, "left"), world.Placed(other, "right")])
    inside = true_masks[1] > 0.99
    assert torch.allclose(kept.pixels[:, inside], truth[:, inside], atol=1e-4) and torch.equal(kept.masks[0], masks[0])
    assert kept.prompt(TEMPLATE, "zqobj circle") == "a photo of a zqobj circle on the left and a green circle on the right, gray background"
    # a centred object leaves no mirrored place free: the other object stands clear of it, whole
    square = torch.zeros(64, 64)
    square[24:40, 20:44] = 1
    other_picture = torch.full((3, 64, 64), 0.3)
    other_picture[:, 8:24, 40:56] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    other_mask = augment.object_by_background(other_picture)
    for move in (True, False):
        centred = augment.beside_another(augment.View(torch.full((3, 64, 64), 0.5) * (1 - square) + square, [square]),
                                         augment.View(other_picture, [other_mask]), "blue square", random.Random(0),
                                         move=move)
        assert abs(float(centred.companion_mask.sum()) - 256) < 1e-3 and float((centred.companion_mask * centred.masks[0]).sum()) == 0
    busy = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert augment.object_by_background(busy) is None  # no plain background: no clean cut
    assert augment.object_by_background(torch.full((3, 32, 32), 0.5)) is None  # nothing stands out


def test_training_beside_objects_cut_from_the_class_images_covers_them_by_the_loss(tmp_path):
    from protobooth.engine.shapesworld import load_shapesworld

    learned = world.HELD_OUT[0]
    photo, masks = scene("gray", [world.Placed(learned, "left")])
    settings = TrainSettings.from_values(steps=1, flip=False, recompose=0.5, recompose_companions=0.5, prior_images=4,
                                         prior_steps=10, templates=(TEMPLATE,))
    with OneShotTrainer(load_shapesworld(), photo, [m > 0.5 for m in masks], ["zqobj"], [learned.words], settings,
                        prior_cache=tmp_path) as trainer:
        assert trainer.beside_another  # the world model's red circles stand on plain backgrounds: most cut cleanly
        examples = [trainer._example() for _ in range(400)]
    beside = [e for e in examples if e.view["view"].companion]
    assert 60 < len(beside) < 140  # half of the recomposed half
    moved = [e for e in beside if e.view["view"].sides_swapped]
    assert 0.3 < len(moved) / len(beside) < 0.7  # half with the object moved, half with it where it stands
    assert {e.prompt for e in moved} == {f"a photo of a zqobj {learned.words} on the right and a {learned.words} on the "
                                         "left, gray background"}
    assert {e.prompt for e in beside if not e.view["view"].sides_swapped} == {
        f"a photo of a zqobj {learned.words} on the left and a {learned.words} on the right, gray background"}
    example = moved[0]
    companion, own = example.view["companion_mask"], example.view["masks"][0]
    half = companion.shape[-1] // 2
    assert float(companion[..., :half].sum()) > 0.9 * float(companion.sum()) > 0  # where the object stood
    assert torch.equal(example.loss_mask(True), torch.maximum(own, companion))  # the loss covers both
    assert torch.equal(example.loss_mask(False), torch.ones_like(own))
    alone = next(e for e in examples if not e.view["view"].companion)
    assert torch.equal(alone.loss_mask(True), alone.view["masks"][0])


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


def test_training_draws_the_photo_beside_a_copy_for_its_share_of_the_recomposed_steps():
    photo, masks = scene("gray", [world.Placed(world.HELD_OUT[0], "left")])
    model = tiny.tiny_model(0)
    settings = TrainSettings.from_values(steps=1, prior_weight=0.0, flip=False, recompose=0.5, recompose_copies=0.5,
                                         templates=(TEMPLATE,))
    with OneShotTrainer(model, photo, [m > 0.5 for m in masks], ["zqobj"], ["circle"], settings) as trainer:
        examples = [trainer._example() for _ in range(400)]
    twice = [e for e in examples if e.view["view"].twice]
    assert 60 < len(twice) < 140  # half of the recomposed half
    assert {e.prompt for e in twice} == {"a photo of a zqobj circle on the left and a zqobj circle on the right, gray background"}
    mask = twice[0].view["masks"][0]  # the latent mask covers both halves
    half = mask.shape[-1] // 2
    assert float(mask[..., :half].sum()) > 0.4 * float(mask.sum()) and float(mask[..., half:].sum()) > 0.4 * float(mask.sum())
    # two objects already stand beside each other: no copies
    two, two_masks = scene("gray", [world.Placed(world.HELD_OUT[0], "left"), world.Placed(world.HELD_OUT[1], "right")])
    with OneShotTrainer(model, two, [m > 0.5 for m in two_masks], ["zqa", "zqb"], ["circle", "square"], settings) as trainer:
        assert not any(trainer._example().view["view"].twice for _ in range(100))


def test_recomposition_settings_are_checked_and_reach_the_command_line(tmp_path, capsys):
    with pytest.raises(InputError, match="recompose"):
        TrainSettings.from_values(recompose=1.5).check()
    with pytest.raises(InputError, match="set recompose above 0"):
        TrainSettings.from_values(recompose_copies=0.5).check()
    with pytest.raises(InputError, match="recompose_companions 0.5 is a share of the recomposed steps"):
        TrainSettings.from_values(recompose_companions=0.5).check()
    with pytest.raises(InputError, match="add up to more than 1"):
        TrainSettings.from_values(recompose=0.5, recompose_copies=0.6, recompose_companions=0.6).check()
    with pytest.raises(InputError, match="set prior_weight above 0"):
        TrainSettings.from_values(recompose=0.5, recompose_companions=0.5, prior_weight=0.0).check()
    with pytest.raises(InputError, match="textboost settings draw none"):
        TrainSettings.from_values("textboost", recompose=0.5, recompose_companions=0.5).check()
    assert main(["train", "photo.png", "--model", "tiny", "--token", "zqobj", "--class", "circle", "--mask", "m.png",
                 "--recompose", "-0.1"]) == 2
    assert "recompose must not be negative (got -0.1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--recompose RECOMPOSE recomposition: the share of steps" in shown and "--recompose-resize" in shown
    assert "--recompose-copies RECOMPOSE_COPIES with recomposition, one object" in shown
    assert "--recompose-companions RECOMPOSE_COMPANIONS with recomposition, one object and a class prior" in shown
