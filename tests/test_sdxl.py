"""SDXL on tiny SDXL-shaped models: two text encoders as one, size conditioning, and files stock tools load."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from protobooth.engine.concept.concept import concept_applied, load_concept, save_concept
from protobooth.engine.errors import InputError
from protobooth.engine.models import tiny
from protobooth.engine.models.sdxl import big_g_ids
from protobooth.engine.train import OneShotTrainer, TrainSettings

from test_train import scene

FAST = TrainSettings.from_values(steps=8, prior_images=2, prior_steps=2, lora_learning_rate=5e-3, token_learning_rate=1e-2)


def test_big_g_reads_the_prompt_padded_as_its_own_tokenizer_pads():
    model = tiny.tiny_model(0, family="sdxl")
    ids = model.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pipeline = model.pipeline()
    own = pipeline.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(big_g_ids(ids), own) and not torch.equal(ids, own)


def test_conditioning_is_what_the_diffusers_pipeline_gives_the_unet():
    model = tiny.tiny_model(0, family="sdxl")
    pipeline = model.pipeline()
    context, _, pooled, _ = pipeline.encode_prompt("a red cube", device="cpu", do_classifier_free_guidance=False)
    ids = model.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours = model.encode(ids)
    assert ours.context.shape[-1] == sum(model.text_widths) == model.unet.config.cross_attention_dim
    assert torch.allclose(ours.context, context, atol=1e-6) and torch.allclose(ours.pooled, pooled, atol=1e-6)


# Each method at settings that move its weights within a few steps (TextBoost's LoRA learns slowly by default).
METHOD_SETTINGS = {
    "object_driven": FAST,
    "textboost": TrainSettings.from_values(method="textboost", steps=6, text_lora_learning_rate=5e-2,
                                           token_learning_rate=1e-2, augment_probability=0),
    "attribute": TrainSettings.from_values(method="attribute", steps=6, token_learning_rate=1e-2),
}
LORA_KEYS = {"object_driven": ("lora_unet_",), "textboost": ("lora_te1_text_model_", "lora_te2_text_model_"),
             "attribute": ("lora_unet_",)}


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_sdxl_concept_files_reproduce_the_trained_pipeline_in_diffusers(tmp_path, method):
    model = tiny.tiny_model(0, family="sdxl")
    image, cat, pot = scene()
    prompt = "a photo of zqcat cat and zqpot teapot"
    draw = dict(num_inference_steps=4, height=64, width=64, output_type="np")
    with OneShotTrainer(model, image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], METHOD_SETTINGS[method],
                        prior_cache=tmp_path / "cache") as trainer:
        result = trainer.train()
        with trainer.trained_pipeline() as pipeline:
            trained = pipeline(prompt, generator=torch.Generator().manual_seed(3), **draw).images
    save_concept(result.concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    stored = load_file(tmp_path / "emb.safetensors")
    assert {k: tuple(v.shape) for k, v in stored.items()} == {"clip_l": (2, tiny.TEXT_WIDTH), "clip_g": (2, tiny.BIG_G_WIDTH)}
    assert set(load_file(tmp_path / "emb_zqcat.safetensors")) == {"clip_l", "clip_g"}
    keys = set(load_file(tmp_path / "lora.safetensors"))
    assert {prefix for prefix in LORA_KEYS[method] if any(key.startswith(prefix) for key in keys)} == set(LORA_KEYS[method])
    assert all(key.startswith(LORA_KEYS[method]) for key in keys)
    concept = load_concept(tmp_path / "emb.safetensors", tmp_path / "lora.safetensors")
    assert concept.text_widths == (tiny.TEXT_WIDTH, tiny.BIG_G_WIDTH)
    pipeline = model.pipeline()  # a plain diffusers SDXL pipeline: stock loaders only
    pipeline.set_progress_bar_config(disable=True)
    with concept_applied(pipeline, concept):
        reloaded = pipeline(prompt, generator=torch.Generator().manual_seed(3), **draw).images
    plain = pipeline(prompt, generator=torch.Generator().manual_seed(3), **draw).images
    assert abs(trained - reloaded).max() <= 1e-4
    assert abs(trained - plain).max() > 1e-3  # the concept does change the picture


def test_an_sdxl_embedding_with_a_half_missing_is_refused(tmp_path):
    from safetensors.torch import save_file

    model = tiny.tiny_model(0, family="sdxl")
    image, cat, _ = scene()
    with OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], FAST.replace(steps=1, prior_weight=0.0),
                        prior_cache=tmp_path / "cache") as trainer:
        concept = trainer.train().concept
    save_concept(concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "emb.safetensors"), "pt") as handle:
        header = handle.metadata()
    save_file({"clip_l": load_file(tmp_path / "emb.safetensors")["clip_l"]}, tmp_path / "half.safetensors", header)
    with pytest.raises(InputError, match="'clip_g'"):
        load_concept(tmp_path / "half.safetensors", tmp_path / "lora.safetensors")


def test_prototype_on_sdxl_searches_the_clip_l_half_and_starts_big_g_from_the_class_word():
    from protobooth.engine.prototype import ClipTowers, PrototypeSettings, prototype_embeddings
    from protobooth.engine.text.vocabulary import class_word_vectors

    model = tiny.tiny_model(0, family="sdxl")
    image, cat, _ = scene()
    towers = ClipTowers.from_clip_model(tiny.tiny_clip(model.text_encoder.clip_l))
    found = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, [cat], ["zqcat"], ["cat"],
                                 PrototypeSettings(steps=5))[0]
    start = class_word_vectors(model.text_encoder, model.tokenizer, "cat", 1)
    width_l = tiny.TEXT_WIDTH
    assert found.vectors.shape == start.shape and found.method == "prototype"
    assert not torch.allclose(found.vectors[:, :width_l], start[:, :width_l])  # searched
    assert torch.equal(found.vectors[:, width_l:], start[:, width_l:])  # the class word's bigG row
