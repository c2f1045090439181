"""Prototypical embedding initialisation with a tiny CLIP whose text tower is the model's text encoder."""
from __future__ import annotations

import logging

import pytest
import torch

from protobooth.engine.compat import set_token_table
from protobooth.engine.models import tiny
from protobooth.engine.errors import InputError
from protobooth.engine.fileio import save_safetensors
from protobooth.engine.prototype import (ClipTowers, PrototypeSettings, load_text_projection, masked_object_crop,
                                         prototype_embeddings)
from protobooth.engine.text.vocabulary import class_word_vectors


def picture():
    image = torch.full((3, 64, 64), 0.5)
    mask = torch.zeros(64, 64)
    mask[10:30, 34:58] = 1
    image[:, mask > 0] = torch.tensor([0.9, 0.1, 0.2])[:, None]
    return image, mask


def test_search_raises_cosine_and_keeps_table_intact():
    model = tiny.tiny_model(0)
    towers = ClipTowers.from_clip_model(tiny.tiny_clip(model.text_encoder))
    table = model.text_encoder.get_input_embeddings().weight.clone()
    image, mask = picture()
    steps = []
    [result] = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, [mask], ["zqcat"], ["cat"],
                                    PrototypeSettings(n_vectors=2, steps=40, learning_rate=2e-2),
                                    progress=lambda step, total: steps.append((step, total)))
    assert result.method == "prototype" and result.vectors.shape == (2, 32)
    assert result.cosine_final > result.cosine_start + 0.05
    assert len(result.nearest) == 5 and all(isinstance(w, str) for w in result.nearest)
    assert steps[-1] == (40, 40)
    assert torch.equal(model.text_encoder.get_input_embeddings().weight, table)
    assert not torch.equal(result.vectors, class_word_vectors(model.text_encoder, model.tokenizer, "cat", 2))


def test_weights_select_what_the_target_is_made_of():
    model = tiny.tiny_model(0)
    towers = ClipTowers.from_clip_model(tiny.tiny_clip(model.text_encoder))
    image, mask = picture()
    results = [
        prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, [mask], ["zqcat"], ["cat"],
                             PrototypeSettings(steps=5, weights=w))[0].vectors
        for w in ((1, 0, 0), (0, 1, 0))
    ]
    assert not torch.equal(*results)


def test_without_clip_falls_back_to_class_word_and_says_so(caplog):
    model = tiny.tiny_model(0)
    image, mask = picture()
    with caplog.at_level(logging.WARNING, logger="protobooth"):
        [result] = prototype_embeddings(None, model.text_encoder, model.tokenizer, image, [mask], ["zqcat"], ["cat"])
    assert "No CLIP model" in caplog.text
    assert result.method == "class-word"
    assert torch.equal(result.vectors, class_word_vectors(model.text_encoder, model.tokenizer, "cat", 1))


def test_mismatched_clip_is_refused_with_the_fix():
    model = tiny.tiny_model(0)
    clip = tiny.tiny_clip(None)
    set_token_table(clip.text_model, torch.nn.Embedding(49408, 16))
    image, mask = picture()
    with pytest.raises(InputError, match="ViT-L/14"):
        prototype_embeddings(ClipTowers.from_clip_model(clip), model.text_encoder, model.tokenizer, image, [mask], ["zqcat"], ["cat"])


def test_masked_crop_is_square_around_the_object_on_grey():
    image, mask = picture()
    crop = masked_object_crop(image, mask, padding=0.1)
    assert crop.shape[1] == crop.shape[2] and 24 <= crop.shape[1] <= 30
    assert torch.allclose(crop[:, 0, 0], torch.full((3,), 0.5))


def test_text_projection_is_read_from_either_file_layout(tmp_path):
    weight = torch.randn(24, 32)  # [projection width, text width], as a Linear weight
    hf = tmp_path / "hf.safetensors"  # a Hugging Face CLIPModel file keeps the rest of the model beside it
    save_safetensors({"text_projection.weight": weight, "visual_projection.weight": torch.randn(24, 16)}, hf)
    openai = tmp_path / "openai.safetensors"  # OpenAI/open_clip: text @ P, so P is the transpose
    save_safetensors({"text_projection": weight.T.half()}, openai)
    assert torch.equal(load_text_projection(hf, 32, "FIX"), weight)
    read = load_text_projection(openai, 32, "FIX")
    assert read.dtype == torch.float32 and torch.equal(read, weight.half().float())


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"text_model.final_layer_norm.weight": torch.ones(32)}, "bad.safetensors holds no CLIP text projection"),
        ({"text_projection.weight": torch.randn(32, 24)},
         "bad.safetensors holds a text_projection.weight of shape [32, 24], but this text encoder is 32 wide, which "
         "needs [projection width, 32]"),
        ({"text_projection": torch.randn(24, 32)},
         "bad.safetensors holds a text_projection of shape [24, 32], but this text encoder is 32 wide, which needs "
         "[32, projection width]"),
        ({"text_projection.weight": torch.randn(2, 24, 32)}, "of shape [2, 24, 32]"),
        ({"text_projection.weight": torch.ones(24, 32, dtype=torch.int32)}, "is not a finite floating-point matrix"),
        ({"text_projection.weight": torch.full((24, 32), float("nan"))}, "is not a finite floating-point matrix"),
        (b"not a safetensors file at all", "bad.safetensors could not be read as a safetensors file"),
    ],
)
def test_files_without_a_fitting_text_projection_are_refused_with_the_fix(tmp_path, tensors, message):
    path = tmp_path / "bad.safetensors"
    if isinstance(tensors, bytes):
        path.write_bytes(tensors)
    else:
        save_safetensors(tensors, path)
    with pytest.raises(InputError) as refused:
        load_text_projection(path, 32, "choose the full CLIP file")
    assert message in str(refused.value) and str(refused.value).endswith("; choose the full CLIP file")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_vectors=0), "vectors per token must be a whole number of at least 1"),
        (dict(steps=0), "prototype steps must be a whole number of at least 1"),
        (dict(steps=-5), "prototype steps"),
        (dict(learning_rate=0.0), "prototype learning rate must be above 0"),
        (dict(learning_rate=-1e-3), "prototype learning rate must be above 0"),
        (dict(weights=(0.0, 0.0, 0.0)), "not all 0"),
        (dict(weights=(1.0, -1.0, 1.0)), "none negative"),
        (dict(weights=(1.0, 1.0)), "three numbers"),
        (dict(token_prompt="a photo"), "token prompt"),
        (dict(crop_fills=()), "crop fills must be one or more grey levels or RGB triples"),
        (dict(crop_fills=(1.5,)), "crop fills"),
        (dict(crop_fills=((0.0, 0.5),)), "crop fills"),
    ],
)
def test_impossible_settings_are_refused_with_or_without_a_clip_model(change, message):
    model = tiny.tiny_model(0)
    towers = ClipTowers.from_clip_model(tiny.tiny_clip(model.text_encoder))
    image, mask = picture()
    for clip in (towers, None):
        with pytest.raises(InputError, match=message):
            prototype_embeddings(clip, model.text_encoder, model.tokenizer, image, [mask], ["zqcat"], ["cat"],
                                 PrototypeSettings(**change))


def test_the_crop_can_sit_on_any_plain_background():
    image, mask = picture()
    crop = masked_object_crop(image, mask, padding=0.1, fill=(0.0, 1.0, 0.0))
    outside = crop[:, 0, 0]  # the padding around the object is the fill
    assert torch.equal(outside, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(masked_object_crop(image, mask, 0.1, fill=0.5), masked_object_crop(image, mask, 0.1))


def test_an_object_only_prototype_over_several_fills_does_not_take_the_photos_background():
    """On ShapesWorld, whose CLIP reads backgrounds: the full θm's token follows the photo's background (the whole
    image is a third of it); the object alone, its crop set on each of the world's backgrounds in turn, does not."""
    from protobooth.engine.shapesworld import clip_towers, load_shapesworld, world

    model, towers = load_shapesworld(), clip_towers()
    instance = world.HELD_OUT[0]
    fills = tuple(tuple(world.BACKGROUNDS[b]) for b in world.BACKGROUNDS_LIST)

    def token(background: str, settings: PrototypeSettings) -> torch.Tensor:
        images, masks = world.render([world.Scene(background, (world.Placed(instance, "left"),))])
        [found] = prototype_embeddings(towers, model.text_encoder, model.tokenizer, images[0], [masks[0, 0]], ["zqobj"],
                                       [instance.shape], settings)
        return found.vectors[0]

    def spread(settings: PrototypeSettings) -> float:
        """How far apart the tokens from the same object on a gray and on a pink photo are (1 − cosine)."""
        return 1 - float(torch.cosine_similarity(token("gray", settings), token("pink", settings), dim=0))

    whole = spread(PrototypeSettings(steps=60))
    object_only = spread(PrototypeSettings(steps=60, weights=(0.0, 1.0, 1.0), crop_fills=fills))
    assert object_only < 0.25 * whole, (object_only, whole)


def test_pooled_text_state_stops_at_the_end_token_and_matches_the_full_pass():
    """eos_pooled runs the text model only up to the longest prompt's end token; the model is causal, so the
    pooled states must be those of the full 77-token pass (the prototype and the trainer's text anchor use it)."""
    from protobooth.engine.text.vocabulary import eos_pooled

    model = tiny.tiny_model(0)
    tokenizer, text_model = model.tokenizer, model.text_encoder
    ids = tokenizer(["a photo of a cat", "a red and blue striped cat on a beach"], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    ends = (ids == tokenizer.eos_token_id).int().argmax(-1)
    seen = []
    hook = text_model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                                with_kwargs=True)
    try:
        pooled = eos_pooled(lambda cut: text_model(input_ids=cut).last_hidden_state, ids, tokenizer.eos_token_id)
        without_end = ids.clone()
        without_end[without_end == tokenizer.eos_token_id] = tokenizer.bos_token_id
        eos_pooled(lambda cut: text_model(input_ids=cut).last_hidden_state, without_end, tokenizer.eos_token_id)
    finally:
        hook.remove()
    full = text_model(input_ids=ids)[0][torch.arange(2), ends]
    assert seen == [int(ends.max()) + 1, ids.shape[1]]  # cut after the longest prompt's end; never without one
    torch.testing.assert_close(pooled, full, rtol=1e-5, atol=1e-5)
