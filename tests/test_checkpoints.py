"""Writing models as original-layout single files, checked against diffusers' own readers of that layout."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
    infer_diffusers_model_type,
)
from safetensors import safe_open

from kit.checkpoints import ldm_state_dict, write_single_file
from protobooth.engine.compat import text_tensors
from protobooth.engine.models import tiny
from protobooth.engine.models.single_file import BIG_G_PREFIX, HINTS_METADATA_KEY
from protobooth.engine.errors import InputError
from protobooth.engine.models.tiny import tiny_model


def original_config(model) -> dict:
    """The ldm (CompVis yaml) config of `model`, as diffusers' config builders expect it."""
    unet, vae = model.unet.config, model.vae.config
    channels = unet.block_out_channels[0]
    return {
        "model": {
            "params": {
                "unet_config": {
                    "params": {
                        "in_channels": unet.in_channels,
                        "out_channels": unet.out_channels,
                        "model_channels": channels,
                        "attention_resolutions": [
                            2**level for level, kind in enumerate(unet.down_block_types) if kind.startswith("CrossAttn")
                        ],
                        "num_res_blocks": unet.layers_per_block,
                        "channel_mult": [c // channels for c in unet.block_out_channels],
                        "num_heads": unet.attention_head_dim,
                        "transformer_depth": unet.transformer_layers_per_block,
                        "context_dim": unet.cross_attention_dim,
                        "use_linear_in_transformer": unet.use_linear_projection,
                    }
                },
                "first_stage_config": {
                    "params": {
                        "ddconfig": {
                            "ch": vae.block_out_channels[0],
                            "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
                            "num_res_blocks": vae.layers_per_block,
                            "z_channels": vae.latent_channels,
                            "in_channels": vae.in_channels,
                            "out_ch": vae.out_channels,
                        }
                    }
                },
            }
        }
    }


def assert_same_tensors(converted: dict, expected: dict) -> None:
    assert set(converted) == set(expected)
    different = [name for name in expected if not torch.equal(converted[name], expected[name])]
    assert not different, different[:5]


def assert_diffusers_reads_back(model) -> None:
    checkpoint = ldm_state_dict(model)
    config = original_config(model)

    unet_config = create_unet_diffusers_config_from_ldm(config, checkpoint)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        assert list(unet_config[key]) == list(model.unet.config[key])
    assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, unet_config), model.unet.state_dict())

    vae_config = create_vae_diffusers_config_from_ldm(config, checkpoint)
    assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, vae_config), model.vae.state_dict())

    text = text_tensors(model.text_encoder)
    if model.family == "sd1":
        converted = convert_ldm_clip_checkpoint(checkpoint)
        assert torch.equal(converted.pop("text_model.embeddings.position_ids")[0], torch.arange(77))
    else:
        converted = convert_open_clip_checkpoint(model.text_encoder, checkpoint)
        # SD2 uses the penultimate OpenCLIP layer: one more block is written, and it passes its input through.
        unused = f"text_model.encoder.layers.{model.text_encoder.config.num_hidden_layers}."
        extra = {name: converted.pop(name) for name in list(converted) if name.startswith(unused)}
        assert len(extra) == 16 and all(not t.any() for t in extra.values())
        width = model.text_encoder.config.hidden_size
        assert torch.equal(checkpoint["cond_stage_model.model.text_projection"], torch.eye(width))  # unused by SD2
    assert_same_tensors({name.removeprefix("text_model."): t for name, t in converted.items()}, text)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_models_read_back_by_diffusers_converters(family):
    assert_diffusers_reads_back(tiny_model(seed=3, family=family))


def test_tiny_sdxl_read_back_by_diffusers_converters():
    """diffusers' converters give back every tensor of SDXL's UNet, VAE and both text encoders (bigG with all its
    blocks: SDXL reads the penultimate hidden state and pools the last)."""
    model = tiny_model(seed=3, family="sdxl")
    checkpoint = ldm_state_dict(model)
    assert_same_tensors(convert_ldm_unet_checkpoint(checkpoint, model.unet.config), model.unet.state_dict())
    assert_same_tensors(convert_ldm_vae_checkpoint(checkpoint, model.vae.config), model.vae.state_dict())

    clip_l = convert_ldm_clip_checkpoint(checkpoint)  # strips conditioner.embedders.0.transformer.
    assert torch.equal(clip_l.pop("text_model.embeddings.position_ids")[0], torch.arange(77))
    assert_same_tensors({name.removeprefix("text_model."): t for name, t in clip_l.items()},
                        text_tensors(model.text_encoder.clip_l))
    big_g = model.text_encoder.clip_g
    assert_same_tensors(convert_open_clip_checkpoint(big_g, checkpoint, prefix=BIG_G_PREFIX), big_g.state_dict())


def test_sdxl_text_projection_is_stored_as_openclip_multiplies_it():
    """OpenCLIP computes features @ text_projection ([width, projection]); transformers' Linear holds the transpose."""
    model = tiny_model(seed=3, family="sdxl")
    stored = ldm_state_dict(model)[BIG_G_PREFIX + "text_projection"]
    assert stored.shape == (tiny.BIG_G_WIDTH, tiny.BIG_G_PROJECTION)
    features = torch.randn(2, tiny.BIG_G_WIDTH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(features @ stored, model.text_encoder.clip_g.text_projection(features), atol=1e-6)


def test_comfy_tiny_model_read_back_by_diffusers_converters(comfy_tiny):
    assert_diffusers_reads_back(comfy_tiny)
    assert infer_diffusers_model_type(ldm_state_dict(comfy_tiny)) == "v1"


def test_sd15_layout_names_for_a_full_size_unet():
    """Real SD1.5 UNet layout (4 levels, 2 blocks, attention on the first three): spot-check the names.

    Building the 860 M-parameter UNet is too slow for a unit test; the map needs only its config.
    """
    from kit.checkpoints import original_names, unet_module_map

    class Config:  # the diffusers SD1.5 UNet config values that decide the layout
        block_out_channels = (320, 640, 1280, 1280)
        layers_per_block = 2
        down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
        up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
        class_embed_type = None
        addition_embed_type = None
        mid_block_type = "UNetMidBlock2DCrossAttn"

    names = original_names(
        [
            "down_blocks.0.downsamplers.0.conv.weight",
            "down_blocks.2.attentions.1.proj_in.weight",
            "down_blocks.3.resnets.1.conv2.bias",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.1.upsamplers.0.conv.bias",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
            "mid_block.resnets.1.time_emb_proj.weight",
        ],
        unet_module_map(Config),
        "",
    )
    assert names == {
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.2.attentions.1.proj_in.weight": "input_blocks.8.1.proj_in.weight",
        "down_blocks.3.resnets.1.conv2.bias": "input_blocks.11.0.out_layers.3.bias",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
        "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight": "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
    }


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_write_single_file(tmp_path, prediction_type):
    model = tiny_model(seed=1, family="sd2", prediction_type=prediction_type)
    path = tmp_path / "models" / "tiny.safetensors"
    write_single_file(model, path)

    assert [p.name for p in path.parent.iterdir()] == ["tiny.safetensors"]  # no temporary file left behind
    expected = ldm_state_dict(model)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        hints = json.loads(f.metadata()[HINTS_METADATA_KEY])
        unet_weight = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert unet_weight.dtype == torch.float16
    assert torch.equal(unet_weight, expected["model.diffusion_model.input_blocks.0.0.weight"].half())
    # ComfyUI's own marker of v-prediction checkpoints.
    assert ("v_pred" in expected) == (prediction_type == "v_prediction")
    assert hints["prediction_type"] == prediction_type and hints["family"] == "sd2"
    assert hints["text_encoder"]["num_attention_heads"] == model.text_encoder.config.num_attention_heads


def test_position_ids_stay_integers(tmp_path):
    path = tmp_path / "tiny.safetensors"
    write_single_file(tiny_model(), path, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as f:
        ids = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
        assert f.get_tensor("first_stage_model.encoder.conv_in.weight").dtype == torch.bfloat16
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])


def test_unets_outside_the_original_layout_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    model = tiny_model()
    model.unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        class_embed_type="timestep",
    )
    with pytest.raises(InputError, match="class or added-condition embeddings"):
        write_single_file(model, tmp_path / "x.safetensors")
    assert not any(tmp_path.iterdir())


def test_comfy_tiny_model_has_comfyuis_sd15_shape(comfy_tiny):
    state = ldm_state_dict(comfy_tiny)
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    # What ComfyUI's SD15 detection requires (research/feasibility.md).
    assert unet["input_blocks.0.0.weight"].shape[:2] == (320, 4)
    assert unet["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 768
    assert unet["input_blocks.1.1.proj_in.weight"].ndim == 4  # 1x1 conv, not linear
    assert not any(k.startswith("label_emb") for k in unet)
    # Full-size VAE and CLIP-L, because ComfyUI hard-codes their configs.
    assert state["first_stage_model.encoder.conv_in.weight"].shape[0] == 128
    assert state["first_stage_model.decoder.up.3.block.0.conv1.weight"].shape[0] == 512
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias" in state
    assert state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sum(t.numel() for t in unet.values()) == pytest.approx(25.8e6, rel=0.01)


def test_comfy_tiny_model_outputs_are_finite(comfy_tiny):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ids = comfy_tiny.tokenizer("a photo of a dog", padding="max_length", return_tensors="pt").input_ids
        hidden = comfy_tiny.text_encoder(ids).last_hidden_state
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        noise = comfy_tiny.unet(latents, 500, hidden).sample
        images = comfy_tiny.vae.decode(latents / comfy_tiny.latent_scaling).sample
    for output in (hidden, noise, images):
        assert torch.isfinite(output).all() and 0.05 < output.std() < 20
