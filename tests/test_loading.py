"""Loading base models: single files (written by the engine and by other tools) and diffusers folders."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_python
from kit.checkpoints import ldm_state_dict, write_single_file
from protobooth.engine.errors import InputError
from protobooth.engine.models.loading import detect_family, load_model
from protobooth.engine.models.families import FAMILIES
from protobooth.engine.models.single_file import CheckpointFile, configs
from protobooth.engine.models.diffusion_model import DiffusionModel
from protobooth.engine.models.families import noise_scheduler
from protobooth.engine.models.tiny import tiny_model
from protobooth.engine.text.tokenizer import clip_tokenizer

MODULES = ("unet", "vae", "text_encoder")


def render(model) -> torch.Tensor:
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipeline(
            "a photo of a dog", num_inference_steps=2, height=64, width=64, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images


def assert_same_weights(loaded, original, rounding=None) -> None:
    for module in MODULES:
        expected, actual = getattr(original, module).state_dict(), getattr(loaded, module).state_dict()
        assert set(actual) == set(expected), module
        for name, tensor in expected.items():
            if rounding is not None:
                tensor = tensor.to(rounding).to(tensor.dtype)
            assert torch.equal(actual[name], tensor), f"{module}.{name}"


@pytest.mark.parametrize(("family", "prediction_type"), [("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction")])
def test_single_file_round_trip_is_exact(tmp_path, family, prediction_type):
    original = tiny_model(seed=5, family=family, prediction_type=prediction_type)
    path = tmp_path / "model.safetensors"
    write_single_file(original, path, dtype=torch.float32)

    assert detect_family(path) == family
    loaded = load_model(path)
    assert (loaded.family, loaded.prediction_type, loaded.name) == (family, prediction_type, "model")
    assert_same_weights(loaded, original)
    assert loaded.fingerprint == original.fingerprint
    assert torch.equal(render(loaded), render(original))


def test_fp16_file_holds_the_fp16_rounded_weights(tmp_path):
    original = tiny_model(seed=6)
    path = tmp_path / "model.safetensors"
    write_single_file(original, path)  # fp16, the default

    loaded = load_model(path)
    assert loaded.unet.dtype == torch.float32
    assert_same_weights(loaded, original, rounding=torch.float16)
    # Rounding the weights to fp16 moves the images by much less than one 8-bit level.
    assert (render(loaded) - render(original)).abs().max() < 1 / 255
    assert loaded.fingerprint == original.fingerprint  # fingerprints are taken at fp16


def test_load_in_half_precision(tmp_path):
    path = tmp_path / "model.safetensors"
    write_single_file(tiny_model(seed=6), path)
    loaded = load_model(path, dtype=torch.float16)
    assert {p.dtype for m in MODULES for p in getattr(loaded, m).parameters()} == {torch.float16}


@pytest.mark.parametrize(("family", "prediction_type"), [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_diffusers_folder_round_trip(tmp_path, family, prediction_type):
    original = tiny_model(seed=7, family=family, prediction_type=prediction_type)
    folder = tmp_path / "my-model"
    original.pipeline().save_pretrained(folder)

    assert detect_family(folder) == family
    loaded = load_model(folder)
    assert (loaded.family, loaded.prediction_type, loaded.name) == (family, prediction_type, "my-model")
    assert loaded.noise_scheduler.config.clip_sample is False
    assert_same_weights(loaded, original)
    assert torch.equal(render(loaded), render(original))

    # Without a tokenizer folder the built-in CLIP tokenizer is used, padded as the family pads.
    for path in (folder / "tokenizer").iterdir():
        path.unlink()
    (folder / "tokenizer").rmdir()
    fallback = load_model(folder, prediction_type="epsilon")
    assert fallback.tokenizer.pad_token == original.tokenizer.pad_token
    assert fallback.prediction_type == "epsilon"


def rule_following_model(family: str) -> DiffusionModel:
    """A small model whose hidden settings follow real checkpoints' rules (heads, GroupNorm 32).

    The SD2 UNet has SD2's 4 levels x 2 blocks, so output_blocks.11 exists for the v-prediction rule.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _rule_following_model(family)


def _rule_following_model(family: str) -> DiffusionModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if family == "sd1":
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(64, 64, 64, 64), layers_per_block=2, cross_attention_dim=64,
            attention_head_dim=[1, 1, 1, 1], use_linear_projection=True,
        )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(
        FAMILIES[family].text_encoder_config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1)
    )
    return DiffusionModel(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>" if family == "sd1" else "!"),
        noise_scheduler=noise_scheduler(), family=family,
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_files_from_other_tools_load_by_the_rules(tmp_path, family):
    """Without ProtoBooth's metadata (as in files from the web), the rules rebuild the same model."""
    original = rule_following_model(family)
    path = tmp_path / "downloaded.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(original).items()}, str(path))

    loaded = load_model(path)
    assert_same_weights(loaded, original)
    expected_heads = 8 if family == "sd1" else [1, 1, 1, 1]  # SD1: 8 heads; SD2: 64-channel heads
    assert loaded.unet.config.attention_head_dim == expected_heads
    assert loaded.text_encoder.config.num_attention_heads == 1
    assert loaded.vae.config.norm_num_groups == loaded.unet.config.norm_num_groups == 32


def test_sd2_prediction_type_without_metadata(tmp_path, caplog):
    original = rule_following_model("sd2")
    state = {k: v.contiguous() for k, v in ldm_state_dict(original).items()}
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    path = tmp_path / "sd2.safetensors"

    save_file(state, str(path))  # LayerNorm bias all zero, as in epsilon releases
    assert load_model(path).prediction_type == "epsilon"
    assert load_model(path, prediction_type="v_prediction").prediction_type == "v_prediction"

    save_file({**state, probe: torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.2}, str(path))
    assert load_model(path).prediction_type == "v_prediction"  # spread like the 768-px v releases
    assert load_model(path, prediction_type="epsilon").prediction_type == "epsilon"

    save_file({**state, "v_pred": torch.tensor([])}, str(path))  # ComfyUI's marker wins over the rule
    assert load_model(path).prediction_type == "v_prediction"


def test_sd1_files_from_older_tools(tmp_path):
    """CLIP-L keys without 'text_model.', in a .ckpt with the Lightning layout (read weights-only)."""
    original = rule_following_model("sd1")
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in ldm_state_dict(original).items()}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, path)
    loaded = load_model(path, family="sd1")
    assert_same_weights(loaded, original)


class NotWeights:
    """Anything but tensors and containers needs unsafe unpickling."""


def test_ckpt_needing_unsafe_unpickling_is_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny_model()), "callback": NotWeights()}, path)
    with pytest.raises(InputError, match="unsafe unpickling"):
        load_model(path)


@pytest.fixture(scope="module")
def comfy_tiny_file(comfy_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("comfy") / "comfy-tiny.safetensors"
    write_single_file(comfy_tiny, path)
    return path


def test_comfy_tiny_file_loads_by_the_rules(comfy_tiny, comfy_tiny_file):
    checkpoint = CheckpointFile(comfy_tiny_file)
    # Its hidden settings are real SD1.5's, so the metadata and the rules agree.
    with_hints = configs(checkpoint, "sd1", "epsilon")
    by_rules = configs(checkpoint, "sd1", "epsilon", use_hints=False)
    assert with_hints[0] == by_rules[0] and with_hints[1] == by_rules[1]
    assert with_hints[2].to_dict() == by_rules[2].to_dict()

    loaded = load_model(comfy_tiny_file, family="sd1")
    assert (loaded.family, loaded.prediction_type) == ("sd1", "epsilon")
    assert_same_weights(loaded, comfy_tiny, rounding=torch.float16)
    assert loaded.fingerprint == comfy_tiny.fingerprint


def write_keys(path, shapes: dict[str, tuple]) -> None:
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path))


UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
        ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3)}, "stand-alone VAE"),
        ({"emb_params": (1, 768)}, "textual-inversion embedding"),
        ({"weight": (3, 3)}, "not a Stable Diffusion checkpoint"),
        ({UNET_CONV_IN: (320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
          "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}, "SDXL model"),
        ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "Flux model"),
        ({UNET_CONV_IN: (320, 9, 3, 3)}, "SD inpainting model"),
        ({UNET_CONV_IN: (320, 4, 3, 3)}, "no text encoder"),
    ],
)
def test_unsupported_files_are_named(tmp_path, shapes, message):
    path = tmp_path / "thing.safetensors"
    write_keys(path, shapes)
    with pytest.raises(InputError, match=message):
        load_model(path)
    with pytest.raises(InputError, match=message):
        detect_family(path)


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nowhere.safetensors")
    with pytest.raises(InputError, match="no model_index.json"):
        load_model(tmp_path)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_model(garbage)

    good = tmp_path / "good.safetensors"
    write_single_file(tiny_model(), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="download it again"):
        load_model(truncated)

    with pytest.raises(InputError, match="is an SD1 model, not SD2"):
        load_model(good, family="sd2")
    with pytest.raises(InputError, match="prediction_type"):
        load_model(good, prediction_type="sample")

    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(InputError, match="not a model file"):
        load_model(other)


def test_unsupported_diffusers_folders_are_named(tmp_path):
    folder = tmp_path / "xl"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"addition_embed_type": "text_time", "in_channels": 4}))
    with pytest.raises(InputError, match="SDXL model"):
        detect_family(folder)


def test_loading_never_touches_the_network(tmp_path):
    """Even without the HF offline variables, loading reads only local files (sockets are refused)."""
    original = tiny_model()
    folder, file = tmp_path / "folder", tmp_path / "file.safetensors"
    original.pipeline().save_pretrained(folder)
    write_single_file(original, file)
    code = f"""
import os, socket
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(name, None)
def refuse(*args, **kwargs):
    raise OSError("network used")
socket.socket.connect = refuse
socket.create_connection = refuse
from protobooth.engine.models.loading import load_model
for path in ({str(folder)!r}, {str(file)!r}):
    print(load_model(path).family)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["sd1", "sd1"]
    assert "network used" not in result.stderr
