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


def test_sdxl_concept_files_reproduce_the_trained_pipeline_in_diffusers(tmp_path):
    model = tiny.tiny_model(0, family="sdxl")
    image, cat, pot = scene()
    prompt = "a photo of zqcat cat and zqpot teapot"
    draw = dict(num_inference_steps=4, height=64, width=64, output_type="np")
    with OneShotTrainer(model, image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], FAST,
                        prior_cache=tmp_path / "cache") as trainer:
        result = trainer.train()
        with trainer.trained_pipeline() as pipeline:
            trained = pipeline(prompt, generator=torch.Generator().manual_seed(3), **draw).images
    save_concept(result.concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    stored = load_file(tmp_path / "emb.safetensors")
    assert {k: tuple(v.shape) for k, v in stored.items()} == {"clip_l": (2, tiny.TEXT_WIDTH), "clip_g": (2, tiny.BIG_G_WIDTH)}
    assert set(load_file(tmp_path / "emb_zqcat.safetensors")) == {"clip_l", "clip_g"}
    assert all(key.startswith("lora_unet_") for key in load_file(tmp_path / "lora.safetensors"))
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


def test_a_method_that_cannot_train_sdxl_says_so_and_names_those_that_can(tmp_path):
    model = tiny.tiny_model(0, family="sdxl")
    image, cat, _ = scene()
    settings = TrainSettings.from_values(method="textboost", steps=1)
    with pytest.raises(InputError, match="TextBoost cannot train SDXL models yet; use object-driven or Attribute"):
        OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=tmp_path / "cache")
