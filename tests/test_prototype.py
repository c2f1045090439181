"""Prototypical embedding initialisation with a tiny CLIP whose text tower is the model's text encoder."""
from __future__ import annotations

import logging

import pytest
import torch

from protobooth.engine import tiny
from protobooth.engine.errors import InputError
from protobooth.engine.prototype import ClipTowers, PrototypeSettings, masked_object_crop, prototype_embeddings
from protobooth.engine.tokens import class_word_vectors


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
    clip.text_model.set_input_embeddings(torch.nn.Embedding(49408, 16))
    image, mask = picture()
    with pytest.raises(InputError, match="ViT-L/14"):
        prototype_embeddings(ClipTowers.from_clip_model(clip), model.text_encoder, model.tokenizer, image, [mask], ["zqcat"], ["cat"])


def test_masked_crop_is_square_around_the_object_on_grey():
    image, mask = picture()
    crop = masked_object_crop(image, mask, padding=0.1)
    assert crop.shape[1] == crop.shape[2] and 24 <= crop.shape[1] <= 30
    assert torch.allclose(crop[:, 0, 0], torch.full((3,), 0.5))
