"""The attribute method (OSTAF, engine/train/methods/attribute.py) on the tiny model: the right UNet half learns,
training starts from the base model, the exported LoRA at strength λ is the engine's offset times λ in diffusers,
and bad settings are refused up front."""
from __future__ import annotations

import logging

import pytest
import torch

from protobooth.engine.concept.concept import concept_applied, load_concept, save_concept
from protobooth.engine.errors import InputError
from protobooth.engine.models import tiny
from protobooth.engine.train import OneShotTrainer, TrainSettings
from protobooth.engine.train.methods.attribute import OffsetNetwork, target_layers

PROMPT = "a photo of zqpattern square"


def photo():
    image = torch.full((3, 64, 64), 0.5)
    mask = torch.zeros(64, 64)
    mask[16:44, 10:38] = 1
    image[:, mask > 0] = torch.tensor([0.9, 0.2, 0.1])[:, None]
    image[:, 28:32, 10:38] = 1.0  # a white band across the square: the "appearance"
    return image, mask


def attribute(**values) -> TrainSettings:
    return TrainSettings.from_values("attribute", **{"steps": 6, "hyper_learning_rate": 1e-2, **values})


def draw(pipeline):
    return pipeline(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images


@pytest.mark.parametrize("values, parts", [
    ({"attribute": "appearance"}, {"up_blocks"}),
    ({"attribute": "style"}, {"up_blocks"}),
    ({"attribute": "shape"}, {"down_blocks"}),
    ({"attribute": "shape", "layers": "both", "include_mid": True}, {"down_blocks", "mid_block", "up_blocks"}),
])
def test_each_attribute_adapts_its_half_of_the_unet(values, parts, tmp_path):
    model = tiny.tiny_model(0)
    image, mask = photo()
    with OneShotTrainer(model, image, [mask], ["zqpattern"], ["square"], attribute(steps=2, **values),
                        prior_cache=tmp_path) as trainer:
        result = trainer.train()
    keys = [key for key in result.concept.lora if key.endswith(".lora_down.weight")]
    found = {part for part in ("down_blocks", "mid_block", "up_blocks") if any(f"lora_unet_{part}_" in key for key in keys)}
    assert found == parts
    settings = attribute(**values).method
    assert len(keys) == len(target_layers(model.unet, settings))
    assert all(key.split(".")[0].endswith(("_attn1_to_q", "_attn1_to_k", "_attn1_to_v", "_attn1_to_out_0", "_attn2_to_q",
                                           "_attn2_to_k", "_attn2_to_v", "_attn2_to_out_0")) for key in keys)


def test_the_offsets_start_at_zero_and_only_the_hypernetwork_trains(tmp_path):
    model = tiny.tiny_model(0)
    layers = target_layers(model.unet, attribute().method)
    network = OffsetNetwork(layers, rank=4, hidden=32, direct=False, seed=0)
    assert all(torch.count_nonzero(up) == 0 for _, up in network())  # ΔW = B·A = 0: the base model at step 0
    assert all(torch.count_nonzero(down) > 0 for down, _ in network())
    image, mask = photo()
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with OneShotTrainer(model, image, [mask], ["zqpattern"], ["square"], attribute(), prior_cache=tmp_path) as trainer:
        trainer.train()
        assert not [n for n, p in model.unet.named_parameters() if p.requires_grad]
        trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        assert sum(p.numel() for p in trainer.method.offsets.parameters()) + 32 == sum(p.numel() for p in trained)
        assert any(torch.count_nonzero(up) for _, up in trainer.method.offsets())
    assert all(torch.equal(value, before[key]) for key, value in model.unet.state_dict().items())
    assert not any(module._forward_hooks for module in model.unet.modules())  # the hooks went with the trainer


@pytest.mark.parametrize("direct", [False, True], ids=["hypernetwork", "direct"])
def test_the_exported_lora_at_strength_lambda_is_the_engines_offset_times_lambda(direct, tmp_path):
    model = tiny.tiny_model(0)
    image, mask = photo()
    drawn = {}
    with OneShotTrainer(model, image, [mask], ["zqpattern"], ["square"], attribute(direct=direct),
                        prior_cache=tmp_path) as trainer:
        result = trainer.train()
        with trainer.trained_pipeline() as pipeline:
            for strength in (0.0, 0.5, 1.0, 1.25):
                trainer.method.strength = strength
                drawn[strength] = draw(pipeline)
    save_concept(result.concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    concept = load_concept(tmp_path / "emb.safetensors", tmp_path / "lora.safetensors")
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with concept_applied(pipeline, concept):
        for strength, expected in drawn.items():
            pipeline.set_adapters(["protobooth"], adapter_weights=[strength])
            assert abs(draw(pipeline) - expected).max() <= 1e-4, strength
    assert abs(drawn[1.0] - drawn[0.0]).max() > 1e-3  # the attribute changes the picture


def test_a_strength_beyond_two_is_warned_about(tmp_path, caplog):
    from protobooth.engine.generate import generate

    model = tiny.tiny_model(0)
    image, mask = photo()
    with OneShotTrainer(model, image, [mask], ["zqpattern"], ["square"], attribute(steps=1), prior_cache=tmp_path) as trainer:
        concept = trainer.train().concept
    with caplog.at_level(logging.WARNING, logger="protobooth"):
        generate(model, [PROMPT], concept, lora_scale=1.25, steps=1)
        assert "beyond" not in caplog.text
        generate(model, [PROMPT], concept, lora_scale=2.5, steps=1)
    assert "strength 2.5 is beyond 2.0 for a Attribute concept (zqpattern)" in caplog.text


@pytest.mark.parametrize("values, message", [
    ({"attribute": "smell"}, "attribute must be one of appearance, shape, style"),
    ({"layers": "left"}, "layers must be one of auto, decoder, encoder, both"),
    ({"hyper_rank": 0}, "hyper rank must be at least 1"),
])
def test_bad_attribute_settings_are_refused_before_anything_runs(values, message):
    with pytest.raises(InputError, match=message):
        attribute(**values).check()


def test_a_rank_wider_than_the_layers_is_refused_before_training(tmp_path):
    image, mask = photo()
    with pytest.raises(InputError, match="LoRA rank 40 is above 32"):
        OneShotTrainer(tiny.tiny_model(0), image, [mask], ["zqpattern"], ["square"], attribute(hyper_rank=40),
                       prior_cache=tmp_path)


def test_the_command_line_trains_an_attribute_and_draws_a_strength_sweep(tmp_path):
    from PIL import Image

    from protobooth.engine.cli import main

    image, mask = photo()
    Image.fromarray((image.movedim(0, -1) * 255).byte().numpy()).save(tmp_path / "photo.png")
    Image.fromarray((mask * 255).byte().numpy()).save(tmp_path / "mask.png")
    tiny.tiny_model(0).pipeline().save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["train", str(tmp_path / "photo.png"), "--model", str(tmp_path / "model"), "--method", "attribute",
                 "--attribute", "shape", "--token", "zqshape", "--class", "square", "--mask", str(tmp_path / "mask.png"),
                 "--steps", "2", "--out", str(out), "--quiet"]) == 0
    concept = load_concept(out / "embeddings" / "zqshape.safetensors", out / "loras" / "zqshape.safetensors")
    assert concept.settings["method"] == {**concept.settings["method"], "name": "attribute", "attribute": "shape"}
    assert concept.lora and all(key.startswith("lora_unet_down_blocks_") for key in concept.lora)
    images = tmp_path / "sweep"
    assert main(["generate", "a photo of zqshape square", "--model", str(tmp_path / "model"), "--concept",
                 str(out / "embeddings" / "zqshape.safetensors"), "--strength-sweep", "--steps", "2", "--out",
                 str(images), "--quiet"]) == 0
    assert len(list(images.glob("*-strength*-seed0.png"))) == 6 and (images / "grid.png").is_file()
