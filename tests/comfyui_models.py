"""Test-only model files that the harness's ComfyUI (2024-03) loads (a CLIP vision tower, a SAM, a ControlNet),
and the photo the node and workflow tests segment.

Random weights (nothing can be downloaded), seeded, with the real architectures and file layouts, so the
server's own loaders read them as they would read the published files:
- CLIP: a full CLIP model file as Hugging Face's openai/clip-vit-large-patch14 model.safetensors is laid
  out: a full-size ViT-L/14 vision tower with its projection (comfy/clip_vision.py recognises it by the key
  of layer 22 and leaves the rest out), and the checkpoint's text encoder as the text tower with a text
  projection, which SD1 checkpoints lack and Prototype Init reads from this file; fp16.
- SAM: the engine's tiny SAM (`kit.sam.tiny_sam`) as a .pth state dict.
- ControlNet: diffusers' ControlNetModel.from_unet on a UNet, written in the original (lllyasviel)
  `control_model.*` layout; comfy/controlnet.py reads that layout for any UNet shape, while its
  diffusers-layout path only knows the published SD1.5/SD2/SDXL shapes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kit.checkpoints import original_names, unet_module_map
from protobooth.engine.fileio import save_safetensors
from kit.models import _init_sensibly
from kit.sam import save_sam_checkpoint, tiny_sam

CONTROLNET_PREFIX = "control_model."
RED_SQUARE = (8, 8, 28, 28)  # (left, top, right, bottom) in the test photo
BLUE_RECTANGLE = (30, 36, 58, 60)


def two_shapes_photo() -> np.ndarray:
    """64x64 RGB uint8: a red square and a blue rectangle on grey."""
    pixels = np.full((64, 64, 3), 128, np.uint8)
    for (left, top, right, bottom), colour in ((RED_SQUARE, (230, 25, 25)), (BLUE_RECTANGLE, (25, 50, 230))):
        pixels[top:bottom, left:right] = colour
    return pixels


def vit_l_14_vision_config():
    """OpenAI CLIP ViT-L/14's vision tower (what SD1.x pairs with); its projection is 768 wide."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip


def write_random_encoder(path: Path):
    """A random object encoder for the ViT-L/14 vision tower and SD1's 768-wide tokens, saved at `path` (its output
    layer random too, so its vectors are not the class word's; no SD1.5 encoder is published). Four vectors per object,
    not the default one, so the tests see several travel through the nodes in order."""
    from protobooth.engine.encoder.model import EncoderShape, ObjectEncoder, save_encoder

    torch.manual_seed(0)
    encoder = ObjectEncoder(EncoderShape(vision_width=1024, text_width=768, queries=4, width=32, layers=1)).eval()
    torch.nn.init.normal_(encoder.out.weight, std=0.02)
    save_encoder(encoder, path)
    return encoder


def write_clip(path: Path, text_encoder, seed: int = 0) -> Path:
    """A full CLIP ViT-L/14 file (about 427 M parameters, 815 MiB in fp16) whose text tower is `text_encoder`.

    The towers' outputs are finite; the text projection is random (not the identity), so that text
    features projected with it differ from the pooled text state.
    """
    from transformers import CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):  # skip transformers' own initialisation: ours replaces it anyway
            model = CLIPVisionModelWithProjection(vit_l_14_vision_config())
        model.to_empty(device="cpu")
        _init_sensibly(model)
        torch.nn.init.normal_(model.vision_model.embeddings.class_embedding, std=0.02)
        width = text_encoder.config.hidden_size
        text_projection = torch.randn(vit_l_14_vision_config().projection_dim, width) * width**-0.5
    state = {name: tensor for name, tensor in model.state_dict().items() if name != "vision_model.embeddings.position_ids"}
    # transformers names a CLIPTextModel's tensors without the "text_model." that a CLIPModel file has
    state.update({"text_model." + name.removeprefix("text_model."): tensor for name, tensor in text_encoder.state_dict().items()
                  if not name.endswith("position_ids")})
    state.update({"text_projection.weight": text_projection, "logit_scale": torch.tensor(4.6052)})
    save_safetensors({name: tensor.half() for name, tensor in state.items()}, path)
    return path


def write_sam(path: Path, seed: int = 0) -> Path:
    save_sam_checkpoint(tiny_sam(seed), path)
    return path


def controlnet_names(unet_config, controlnet_state: dict) -> dict[str, str]:
    """diffusers ControlNetModel names → the original ControlNet names (under CONTROLNET_PREFIX)."""
    modules = dict(unet_module_map(unet_config))
    # the hint encoder: convolutions at every other place of the original Sequential (SiLUs between)
    modules["controlnet_cond_embedding.conv_in."] = ("input_hint_block.0.", {})
    blocks = sorted({int(name.split(".")[2]) for name in controlnet_state if name.startswith("controlnet_cond_embedding.blocks.")})
    for index in blocks:
        modules[f"controlnet_cond_embedding.blocks.{index}."] = (f"input_hint_block.{2 * (index + 1)}.", {})
    modules["controlnet_cond_embedding.conv_out."] = (f"input_hint_block.{2 * (len(blocks) + 1)}.", {})
    for index in {int(name.split(".")[1]) for name in controlnet_state if name.startswith("controlnet_down_blocks.")}:
        modules[f"controlnet_down_blocks.{index}."] = (f"zero_convs.{index}.0.", {})
    modules["controlnet_mid_block."] = ("middle_block_out.0.", {})
    return original_names(controlnet_state, modules, CONTROLNET_PREFIX)


def write_controlnet(unet, path: Path, seed: int = 0) -> Path:
    """A ControlNet for `unet` (a diffusers SD1/SD2 UNet) whose hint changes the result.

    from_unet copies the UNet's encoder; the hint encoder's last layer and the output convolutions start
    at zero in real training, which would make the ControlNet do nothing, so they get small random weights.
    """
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet)
        zero_started = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                        *controlnet.controlnet_down_blocks]  # fmt: skip
        for layer in zero_started:
            torch.nn.init.normal_(layer.weight, std=0.1 * layer.weight[0].numel() ** -0.5)
    state = controlnet.state_dict()
    names = controlnet_names(unet.config, state)
    save_safetensors({names[name]: tensor.half() for name, tensor in state.items()}, path)
    return path
