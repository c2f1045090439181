"""TextBoost (engine/train/methods/textboost.py) and the trainer's paired augmentation (engine/train/augment.py), on
ShapesWorld pictures and the tiny model: the views and their words agree, only the text side learns, the files
reproduce in diffusers, the knowledge-preservation loss does its job, and bad settings are refused up front."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from protobooth.engine.concept.concept import concept_applied, load_concept, save_concept
from protobooth.engine.errors import InputError
from protobooth.engine.models import tiny
from protobooth.engine.shapesworld import world
from protobooth.engine.train import OneShotTrainer, TrainSettings, augment
from protobooth.engine.train.methods.textboost import everyday_captions

INSTANCE = world.HELD_OUT[0]  # red circle, white band across
SIZE = 128


def shapes_photo() -> augment.View:
    """The benchmark's reference photo (the instance on the left, gray background), scaled up to 128 px."""
    image, masks = world.render([world.Scene("gray", (world.Placed(INSTANCE, "left"),))])
    pixels = F.interpolate(image, size=(SIZE, SIZE), mode="nearest")[0]
    mask = F.interpolate(masks[:, :1], size=(SIZE, SIZE), mode="nearest")[0, 0]
    return augment.View(pixels, [mask])


def object_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """Where the picture shows the instance: its red or its white, neither the background nor a collage border."""
    colours = torch.tensor([world.COLOURS[INSTANCE.colour], world.COLOURS[INSTANCE.accent_colour]])
    distance = (pixels[None] - colours[:, :, None, None]).abs().amax(1).amin(0)
    return distance < 0.15


def background_pixels(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(world.BACKGROUNDS["gray"])[:, None, None]).abs().amax(0) < 0.05


def centre_x(mask: torch.Tensor) -> float:
    return float((mask * torch.arange(mask.shape[-1])).sum() / mask.sum())


@pytest.mark.parametrize("name", augment.GEOMETRIC)
def test_each_geometric_augmentation_moves_the_mask_with_the_object_and_its_words_say_how(name):
    photo = shapes_photo()
    for seed in range(8):
        view = augment.apply(photo, name, random.Random(seed))
        words = view.prefix + view.suffix
        assert set(words) <= set(augment.ADDS[name]), words
        assert len(words) == 1 or (name == "zoom" and len(words) <= 1)
        mask, shown, background = view.masks[0] > 0.5, object_pixels(view.pixels), background_pixels(view.pixels)
        assert shown.any() and mask.any()
        # Aligned, no object pixel lies outside the mask and no background pixel inside it (the edges between are
        # blends); a mask 3 px (of 128) off breaks one or the other by 2.5% or more.
        assert (shown & ~mask).sum() / shown.sum() < 0.005, (name, seed)
        assert (background & mask).sum() / mask.sum() < 0.005, (name, seed)
        area = view.masks[0].sum() / photo.masks[0].sum()
        if words == ("<zoom-in>",):
            assert area > 1.3
        elif words == ("<zoom-out>",):
            assert area < 0.45
        elif name == "shift":
            moved = centre_x(view.masks[0]) - centre_x(photo.masks[0])
            assert (moved < -0.1 * SIZE) if words == ("<left>",) else (moved > 0.1 * SIZE), (words, moved)
        elif name == "hflip":
            assert abs(centre_x(view.masks[0]) - (SIZE - 1 - centre_x(photo.masks[0]))) < 0.5


@pytest.mark.parametrize("name", augment.COLOUR)
def test_colour_augmentations_keep_the_mask_and_name_the_change(name):
    photo = shapes_photo()
    for seed in range(4):
        view = augment.apply(photo, name, random.Random(seed))
        assert torch.equal(view.masks[0], photo.masks[0])
        inside = photo.masks[0] > 0.5
        before, after = photo.pixels[:, inside], view.pixels[:, inside]
        if name == "grayscale":
            assert view.suffix == ("<grayscale>",) and torch.allclose(after[0], after[1]) and torch.allclose(after[1], after[2])
        else:
            (word,) = view.prefix
            assert (after.mean() < before.mean()) == (word == "<dimmed>")


def test_views_are_seeded_and_their_prompts_carry_their_words():
    photo = shapes_photo()
    first = augment.views(photo, augment.AUGMENTATIONS, 0.5, 12, seed=4)
    again = augment.views(photo, augment.AUGMENTATIONS, 0.5, 12, seed=4)
    assert len(first) == 12 and first[0] is photo
    assert all(torch.equal(a.pixels, b.pixels) and a.prefix + a.suffix == b.prefix + b.suffix for a, b in zip(first, again))
    assert any(view.prefix or view.suffix for view in first[1:])
    for view in first:
        assert view.prompt("a photo of {}", "zq circle").split() == [*view.prefix, "a", "photo", "of", "zq", "circle", *view.suffix]
    always = augment.views(photo, ("rotate",), 1.0, 5, seed=0)
    assert all(view.prefix == ("<rotated>",) for view in always[1:])
    assert all(not (view.prefix or view.suffix) for view in augment.views(photo, augment.AUGMENTATIONS, 0.0, 5, seed=0))
    assert augment.tokens_of(("zoom", "grayscale")) == ["<zoom-in>", "<zoom-out>", "<grayscale>"]


# ------------------------------------------------------------------------------------------------------ the method

def tiny_photo():
    """A 64-px picture of a red square on gray and its mask."""
    image = torch.full((3, 64, 64), 0.5)
    mask = torch.zeros(64, 64)
    mask[16:44, 10:38] = 1
    image[:, mask > 0] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    return image, mask


def textboost(**values) -> TrainSettings:
    return TrainSettings.from_values("textboost", **{"steps": 6, "text_lora_learning_rate": 5e-3,
                                                    "token_learning_rate": 1e-2, "augment_views": 6, **values})


def test_textboost_defaults_are_the_papers():
    settings = TrainSettings.from_values("textboost")
    method = settings.method
    assert (method.text_lora_rank, method.text_lora_learning_rate, method.knowledge_weight, method.knowledge_batch) == (4, 5e-5, 0.1, 8)
    assert (method.null_prompt_probability, method.class_prompt_probability) == (0.1, 0.1)
    assert (settings.augment_probability, settings.timestep_sampling, settings.token_learning_rate) == (0.5, "snr", 1e-3)
    assert len(everyday_captions()) == 60
    assert TrainSettings.from_values().augment_probability == 0  # the default method trains on the photo as it is


def test_textboost_trains_the_text_side_alone_and_leaves_the_model_as_it_was(tmp_path):
    model = tiny.tiny_model(0)
    image, mask = tiny_photo()
    before = {name: {k: v.clone() for k, v in part.state_dict().items()}
              for name, part in (("unet", model.unet), ("vae", model.vae), ("text", model.text_encoder))}
    with OneShotTrainer(model, image, [mask], ["zqsquare"], ["square"], textboost(), prior_cache=tmp_path) as trainer:
        assert len(trainer.vocabulary.tokens) > 1  # augmentation tokens train beside the object's
        result = trainer.train()
        trainable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
        lora = [p for n, p in model.text_encoder.named_parameters() if "lora" in n]
    assert not trainable and lora and all(p.requires_grad for p in lora)
    concept = result.concept
    assert concept.tokens == ["zqsquare"]  # augmentation tokens are training aids, never saved
    assert concept.lora and all(key.startswith("lora_te_text_model_encoder_layers_") for key in concept.lora)
    layers = model.text_encoder.config.num_hidden_layers
    assert len([k for k in concept.lora if k.endswith("lora_down.weight")]) == 4 * layers  # q, k, v, out per layer
    assert all(torch.isfinite(torch.tensor(result.losses)))
    for name, part in (("unet", model.unet), ("vae", model.vae), ("text", model.text_encoder)):
        state = part.state_dict()
        assert list(state) == list(before[name]), name
        assert all(torch.equal(state[k], before[name][k]) for k in state), name


def test_textboost_files_reproduce_in_diffusers_through_its_stock_loaders(tmp_path):
    model = tiny.tiny_model(0)
    image, mask = tiny_photo()
    prompt = "a photo of zqsquare square"

    def draw(pipeline):
        return pipeline(prompt, num_inference_steps=3, height=64, width=64, output_type="np",
                        generator=torch.Generator().manual_seed(3)).images

    with OneShotTrainer(model, image, [mask], ["zqsquare"], ["square"], textboost(steps=8), prior_cache=tmp_path) as trainer:
        result = trainer.train()
        with trainer.trained_pipeline() as pipeline:
            trained = draw(pipeline)
    save_concept(result.concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    concept = load_concept(tmp_path / "emb.safetensors", tmp_path / "lora.safetensors")
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with concept_applied(pipeline, concept):  # load_textual_inversion + load_lora_weights
        reloaded = draw(pipeline)
        pipeline.set_adapters(["protobooth"], adapter_weights=[0.0])
        tokens_only = draw(pipeline)
    assert abs(trained - reloaded).max() <= 1e-4
    assert abs(trained - tokens_only).max() > 1e-3  # the text encoder's LoRA does change the picture
    # diffusers leaves the encoder marked as adapted: a second training must still save the LoRA alone.
    with OneShotTrainer(model, image, [mask], ["zqsquare"], ["square"], textboost(steps=1), prior_cache=tmp_path) as trainer:
        assert set(trainer.train().concept.lora) == set(concept.lora)


def test_knowledge_preservation_keeps_everyday_language_closer_to_the_base_model(tmp_path):
    captions = list(everyday_captions()[:16])

    def drift(weight: float) -> float:
        model = tiny.tiny_model(0)
        image, mask = tiny_photo()
        settings = textboost(steps=12, text_lora_learning_rate=3e-2, knowledge_weight=weight, augment_probability=0)
        with OneShotTrainer(model, image, [mask], ["zqsquare"], ["square"], settings, prior_cache=tmp_path) as trainer:
            with torch.no_grad():
                frozen = trainer.encode_frozen(captions).context.float()
            trainer.train()
            with torch.no_grad():
                ids = trainer.vocabulary.input_ids(captions)
                tuned = model.text_encoder(input_ids=ids)[0].float()
        return float((1 - F.cosine_similarity(tuned, frozen, dim=-1)).mean())

    without, kept = drift(0.0), drift(1.0)
    assert without > 1e-3  # the LoRA does move everyday prompts when nothing holds them
    assert kept < 0.7 * without, (kept, without)


@pytest.mark.parametrize("values, message", [
    ({"augmentations": ("zoom", "solarize")}, "augmentation 'solarize' does not exist"),
    ({"augment_probability": 1.5}, "augment probability"),
    ({"null_prompt_probability": 0.7, "class_prompt_probability": 0.5}, "add up to more than 1"),
    ({"text_lora_layers": "everything"}, "text lora layers must be one of attention, attention\\+mlp"),
    ({"knowledge_weight": -1.0}, "knowledge weight must not be negative"),
])
def test_bad_textboost_settings_are_refused_before_anything_runs(values, message):
    with pytest.raises(InputError, match=message):
        textboost(**values).check()


def test_an_object_token_that_is_an_augmentation_token_is_refused(tmp_path):
    image, mask = tiny_photo()
    with pytest.raises(InputError, match="augmentation token"):
        OneShotTrainer(tiny.tiny_model(0), image, [mask], ["<zoom-in>"], ["square"], textboost(), prior_cache=tmp_path)


def test_the_command_line_trains_and_exports_a_textboost_concept(tmp_path):
    from PIL import Image

    from protobooth.engine.cli import main

    image, mask = tiny_photo()
    Image.fromarray((image.movedim(0, -1) * 255).byte().numpy()).save(tmp_path / "photo.png")
    Image.fromarray((mask * 255).byte().numpy()).save(tmp_path / "mask.png")
    tiny.tiny_model(0).pipeline().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["train", str(tmp_path / "photo.png"), "--model", str(tmp_path / "model"), "--method", "textboost",
                 "--token", "zqsquare", "--class", "square", "--mask", str(tmp_path / "mask.png"), "--steps", "2",
                 "--augment-views", "3", "--knowledge-weight", "0.5", "--out", str(out), "--quiet"]) == 0
    concept = load_concept(out / "embeddings" / "zqsquare.safetensors", out / "loras" / "zqsquare.safetensors")
    assert concept.settings["method"]["knowledge_weight"] == 0.5 and concept.settings["steps"] == 2
    assert concept.lora and all(key.startswith("lora_te_") for key in concept.lora)


def test_without_token_training_the_prompt_is_still_encoded_through_the_training_lora(tmp_path):
    """Frozen tokens alone do not make a prompt's conditioning fixed: TextBoost's LoRA sits in the text encoder."""
    image, mask = tiny_photo()
    settings = textboost(steps=6, text_lora_learning_rate=5e-2, train_tokens=False, augment_probability=0)
    with OneShotTrainer(tiny.tiny_model(0), image, [mask], ["zqsquare"], ["square"], settings, prior_cache=tmp_path) as trainer:
        prompt = settings.templates[0].format("zqsquare square")
        with torch.no_grad():
            before = trainer._encode_prompt(prompt).context.clone()
        trainer.train()
        with torch.no_grad():
            after = trainer._encode_prompt(prompt).context
    assert not trainer.text_is_frozen()
    assert not torch.allclose(before, after)
