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
from protobooth.engine.models.loading import configs, detect_family, load_model
from protobooth.engine.models.families import FAMILIES
from protobooth.engine.models.single_file import CheckpointFile
from protobooth.engine.models.diffusion_model import DiffusionModel
from protobooth.engine.models.families import noise_scheduler
from protobooth.engine.models import tiny
from protobooth.engine.models.tiny import tiny_model
from protobooth.engine.text.tokenizer import END_TOKEN_ID, clip_tokenizer

MODULES = ("unet", "vae", "text_encoder")


def render(model) -> torch.Tensor:
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipeline(
            "a photo of a dog", num_inference_steps=2, height=64, width=64, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images


def assert_same_pictures(loaded, original) -> None:
    """The same pictures up to float rounding: identical weights read from a file can lie at other memory alignments,
    which vectorised kernels round differently (last bits only; a wrong setting moves pixels by far more)."""
    assert (render(loaded) - render(original)).abs().max() < 1e-5


def assert_same_weights(loaded, original, rounding=None) -> None:
    for module in MODULES:
        expected, actual = getattr(original, module).state_dict(), getattr(loaded, module).state_dict()
        assert set(actual) == set(expected), module
        for name, tensor in expected.items():
            if rounding is not None:
                tensor = tensor.to(rounding).to(tensor.dtype)
            assert torch.equal(actual[name], tensor), f"{module}.{name}"


@pytest.mark.parametrize(("family", "prediction_type"),
                         [("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
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


@pytest.mark.parametrize(("family", "prediction_type"), [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_diffusers_folder_round_trip(tmp_path, family, prediction_type):
    original = tiny_model(seed=7, family=family, prediction_type=prediction_type)
    folder = tmp_path / "my-model"
    original.pipeline().save_pretrained(folder)

    assert detect_family(folder) == family
    loaded = load_model(folder)
    assert (loaded.family, loaded.prediction_type, loaded.name) == (family, prediction_type, "my-model")
    assert loaded.noise_scheduler.config.clip_sample is False
    assert_same_weights(loaded, original)
    assert_same_pictures(loaded, original)

    # Without a tokenizer folder the built-in CLIP tokenizer is used, padded as the family pads.
    for path in (folder / "tokenizer").iterdir():
        path.unlink()
    (folder / "tokenizer").rmdir()
    fallback = load_model(folder, prediction_type="epsilon")
    assert fallback.tokenizer.pad_token == original.tokenizer.pad_token
    assert fallback.prediction_type == "epsilon"


def test_sdxl_folder_with_the_legacy_end_token_id_pools_at_the_end_token(tmp_path):
    """Text-encoder configs saved before transformers fixed it say eos_token_id 2, with which transformers pools at the
    largest token id; SDXL's diffusers pipeline hands that pooled vector to the UNet, so loading sets the end token."""
    folder = tmp_path / "legacy"
    tiny_model(seed=8, family="sdxl").pipeline().save_pretrained(folder)
    for part in ("text_encoder", "text_encoder_2"):
        config = json.loads((folder / part / "config.json").read_text())
        (folder / part / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))

    loaded = load_model(folder)
    encoders = (loaded.text_encoder.clip_l, loaded.text_encoder.clip_g)
    assert [encoder.config.eos_token_id for encoder in encoders] == [END_TOKEN_ID, END_TOKEN_ID]
    assert loaded.text_encoder.clip_g.text_model.eos_token_id == END_TOKEN_ID
    # A new word's id is above the end token's, so pooling at the largest id would pool at the word.
    loaded.tokenizer.add_tokens(["zqnew"])
    for encoder in encoders:
        encoder.resize_token_embeddings(len(loaded.tokenizer))
    ids = loaded.tokenizer(["a zqnew cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.argmax(-1) != (ids == END_TOKEN_ID).int().argmax(-1)
    pipeline = loaded.pipeline()
    with torch.no_grad():
        _, _, pooled, _ = pipeline.encode_prompt("a zqnew cat", device="cpu", do_classifier_free_guidance=False)
        assert torch.allclose(pooled, loaded.encode(ids).pooled, atol=1e-6)


def test_sdxl_folder_of_fp16_variant_files_loads(tmp_path):
    """Some downloads hold only the fp16 variant (*.fp16.safetensors) in every component folder, bigG's included."""
    original = tiny_model(seed=9, family="sdxl")
    original.pipeline().save_pretrained(tmp_path / "xl", variant="fp16")
    assert [p.name for p in (tmp_path / "xl" / "text_encoder_2").glob("*.safetensors")] == ["model.fp16.safetensors"]
    assert_same_weights(load_model(tmp_path / "xl"), original)


def rule_following_model(family: str) -> DiffusionModel:
    """A small model whose hidden settings follow real checkpoints' rules (heads, GroupNorm 32).

    The SD2 UNet has SD2's 4 levels x 2 blocks, so output_blocks.11 exists for the v-prediction rule. The SDXL one has
    SDXL's shape: no attention at the first level, more transformer layers further down, size conditioning.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _rule_following_model(family)


def _rule_following_model(family: str) -> DiffusionModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from protobooth.engine.models.sdxl import SDXLTextEncoder, text_configs

    if family == "sdxl":
        config_l, config_g = text_configs(width_l=64, width_g=128, layers_l=2, layers_g=2, heads_l=1, heads_g=2,
                                          projection=96, intermediate_l=96, intermediate_g=160)
        text_encoder = SDXLTextEncoder(CLIPTextModel(config_l), CLIPTextModelWithProjection(config_g))
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=64 + 128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[1, 2, 2],
            transformer_layers_per_block=[1, 1, 2], use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=96 + 6 * 8,
        )
    elif family == "sd1":
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
    if family != "sdxl":
        text_encoder = CLIPTextModel(FAMILIES[family].text_encoder_config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1))
    vae.register_to_config(scaling_factor=FAMILIES[family].latent_scaling)
    return DiffusionModel(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(pad_token=FAMILIES[family].pad_token),
        noise_scheduler=noise_scheduler(), family=family,
    )


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_files_from_other_tools_load_by_the_rules(tmp_path, family):
    """Without ProtoBooth's metadata (as in files from the web), the rules rebuild the same model."""
    original = rule_following_model(family)
    path = tmp_path / "downloaded.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(original).items()}, str(path))

    loaded = load_model(path)
    assert_same_weights(loaded, original)
    assert loaded.unet.config.attention_head_dim == original.unet.config.attention_head_dim  # SD1: 8; else 64-wide heads

    def text_heads(model) -> list[int]:  # by the rule, one per 64 channels
        encoders = (model.text_encoder.clip_l, model.text_encoder.clip_g) if family == "sdxl" else (model.text_encoder,)
        return [encoder.config.num_attention_heads for encoder in encoders]

    assert text_heads(loaded) == text_heads(original)
    assert loaded.vae.config.norm_num_groups == loaded.unet.config.norm_num_groups == 32
    assert loaded.latent_scaling == original.latent_scaling
    # Heads and the size conditioning's split do not show in the weights; the pictures show them.
    assert_same_pictures(loaded, original)


def test_full_size_sdxl_unet_is_read_as_its_official_config():
    """SDXL base's UNet (the diffusers config of stable-diffusion-xl-base-1.0), built without memory: the shapes of its
    original-layout names give a UNet of the same tensors, with its 64-channel heads and 256-wide size embeddings."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from kit.checkpoints import original_names, unet_module_map
    from protobooth.engine.models.single_file import UNET_PREFIX, unet_config

    official = dict(
        sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    with init_empty_weights():
        unet = UNet2DConditionModel(**official)
    tensors = unet.state_dict()
    names = original_names(tensors, unet_module_map(unet.config), UNET_PREFIX)
    pooled_width = 1280  # bigG's projection
    shapes = {names[name]: tuple(tensor.shape) for name, tensor in tensors.items()}
    config = unet_config(shapes, "sdxl", "epsilon", pooled_width=pooled_width)

    for key in ("attention_head_dim", "addition_time_embed_dim", "cross_attention_dim", "sample_size"):
        assert config[key] == official[key], key
    with init_empty_weights():
        rebuilt = UNet2DConditionModel(**config).state_dict()
    assert {name: t.shape for name, t in rebuilt.items()} == {name: t.shape for name, t in tensors.items()}


def test_reduced_sdxl_layouts_load_by_their_shapes(tmp_path):
    """Distilled SDXLs (Segmind's SSD-1B, Vega) drop transformer layers block by block, differently on the way up than
    on the way down, and SSD-1B's middle block is a single resnet: the depths are read block by block."""
    from diffusers import UNet2DConditionModel

    original = tiny_model(seed=4, family="sdxl")
    original.unet = tiny.seeded(4, lambda: UNet2DConditionModel(
        sample_size=tiny.TINY_RESOLUTION // 8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", cross_attention_dim=tiny.TEXT_WIDTH + tiny.BIG_G_WIDTH,
        attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=[[1, 1], [2, 1]], reverse_transformer_layers_per_block=[[3, 1, 2], [1, 1, 1]],
        addition_embed_type="text_time", addition_time_embed_dim=tiny.TIME_EMBED,
        projection_class_embeddings_input_dim=tiny.BIG_G_PROJECTION + 6 * tiny.TIME_EMBED,
    ).eval())
    path = tmp_path / "reduced.safetensors"
    write_single_file(original, path, dtype=torch.float32)

    loaded = load_model(path)
    assert loaded.unet.config.mid_block_type == "UNetMidBlock2D"
    assert_same_weights(loaded, original)
    assert torch.equal(render(loaded), render(original))


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
LABEL_EMB = "model.diffusion_model.label_emb.0.0.weight"
SDXL_TEXT = {"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
             "conditioner.embedders.1.model.positional_embedding": (77, 8)}


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
        ({"encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_in.weight": (8, 4, 3, 3)}, "stand-alone VAE"),
        ({"emb_params": (1, 768)}, "textual-inversion embedding"),
        ({"weight": (3, 3)}, "not a Stable Diffusion checkpoint"),
        ({UNET_CONV_IN: (320, 4, 3, 3), LABEL_EMB: (8, 16),
          "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768)},
         "SDXL-style text encoders .* but not SDXL's pair"),
        ({UNET_CONV_IN: (384, 4, 3, 3), LABEL_EMB: (8, 16),
          "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": (8,)}, "SDXL refiner model"),
        ({UNET_CONV_IN: (320, 9, 3, 3), LABEL_EMB: (8, 16), **SDXL_TEXT}, "SDXL inpainting model"),
        ({UNET_CONV_IN: (320, 4, 3, 3), **SDXL_TEXT}, "lacks SDXL's size conditioning"),
        ({UNET_CONV_IN: (320, 4, 3, 3), LABEL_EMB: (8, 16), **SDXL_TEXT, "edm_mean": (1, 4, 1, 1)}, "Playground v2.5"),
        ({UNET_CONV_IN: (320, 4, 3, 3), LABEL_EMB: (8, 16), "cond_stage_model.model.positional_embedding": (77, 8)},
         "class-conditioned"),
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


CLIP_L = ["transformers", "CLIPTextModel"]


@pytest.mark.parametrize(("index", "unet", "message"), [
    # The refiner: bigG alone, saved as text_encoder_2.
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]},
     {"addition_embed_type": "text_time", "in_channels": 4}, "SDXL refiner model"),
    ({"_class_name": "StableDiffusionXLPipeline", "text_encoder": CLIP_L},
     {"addition_embed_type": "text_time", "in_channels": 9}, "SDXL inpainting model"),
    ({"_class_name": "StableDiffusionXLPipeline", "text_encoder": CLIP_L,
      "scheduler": ["diffusers", "EDMDPMSolverMultistepScheduler"]},
     {"addition_embed_type": "text_time", "in_channels": 4}, "Playground v2.5"),
    ({"_class_name": "StableDiffusionXLInpaintPipeline", "text_encoder": CLIP_L},
     {"addition_embed_type": "text_time", "in_channels": 4}, "SDXL inpainting model"),
    ({"_class_name": "StableDiffusionPipeline", "text_encoder": CLIP_L}, {"class_embed_type": "projection"},
     "class-conditioned model"),
    ({"_class_name": "StableDiffusion3Pipeline"}, {}, "Stable Diffusion 3 model"),
])
def test_unsupported_diffusers_folders_are_named(tmp_path, index, unet, message):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    with pytest.raises(InputError, match=message):
        detect_family(folder)


def test_loading_never_touches_the_network(tmp_path):
    """Even without the HF offline variables, loading reads only local files (sockets are refused)."""
    paths = []
    for family in ("sd1", "sdxl"):
        original = tiny_model(family=family)
        folder, file = tmp_path / f"{family}-folder", tmp_path / f"{family}-file.safetensors"
        original.pipeline().save_pretrained(folder)
        write_single_file(original, file)
        paths += [str(folder), str(file)]
    code = f"""
import os, socket
for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(name, None)
def refuse(*args, **kwargs):
    raise OSError("network used")
socket.socket.connect = refuse
socket.create_connection = refuse
from protobooth.engine.models.loading import load_model
for path in {paths!r}:
    print(load_model(path).family)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["sd1", "sd1", "sdxl", "sdxl"]
    assert "network used" not in result.stderr
