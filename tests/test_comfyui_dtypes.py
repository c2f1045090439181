"""Train Concept, Prototype Init and Apply Concept in every dtype the current ComfyUI puts models in.

Each case starts the current ComfyUI with the flags users (or their GPUs) choose: the UNet stored in fp32, fp16,
bf16 or fp8, the VAE and the text encoder in fp32, fp16 or bf16. On a CPU ComfyUI computes a half-precision or
fp8 UNet in fp32 (its manual cast) and the text encoder in fp32; the views compute the same way, and the VAE in
fp32, casting the stored weights on use (engine/models/precision.py). In each case the class images are drawn, the loss
must fall, and the saved concept through the stock LoraLoader and `embedding:` must give Apply Concept's
prediction exactly.

The default suite runs the usual GPU setup (fp8 UNet, bf16 VAE, fp16 text encoder); the rest of a covering set
(every dtype of every part at least once) and the other 32 combinations are slow-marked (`pytest -m slow`): each
case costs 35-60 s here, and the default suite's 15 minutes went to SDXL and the browser tests. The node tests
elsewhere run ComfyUI's CPU default (fp32 UNet and VAE, fp16 text encoder) in both builds.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from PIL import Image

from comfyui_harness import CURRENT, ComfyUIServer
from comfyui_models import RED_SQUARE, two_shapes_photo
from test_concept_nodes import PHOTO, lora_keys_not_loaded, prediction, prediction_nodes, training_graph

UNET = {"fp32": "--fp32-unet", "fp16": "--fp16-unet", "bf16": "--bf16-unet", "fp8": "--fp8_e4m3fn-unet"}
VAE = {"fp32": "--fp32-vae", "fp16": "--fp16-vae", "bf16": "--bf16-vae"}
TEXT = {"fp32": "--fp32-text-enc", "fp16": "--fp16-text-enc", "bf16": "--bf16-text-enc"}
TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}
# Every dtype of every part at least once in four cases, the usual GPU setup (fp8 UNet, bf16 VAE, fp16 text encoder)
# among them: each case costs about 40 s here, mostly the full-size CLIP-L text encoder that ComfyUI's SD1.5
# detection requires.
COVERING = [("fp8", "bf16", "fp16"), ("fp32", "fp16", "bf16"), ("fp16", "fp32", "fp32"), ("bf16", "bf16", "fp32")]
EVERY = [combination for combination in itertools.product(UNET, VAE, TEXT) if combination not in COVERING]
CHECKPOINT = "protobooth-tiny-sd15.safetensors"
VISION = "protobooth-random-clip-vit-l-14.safetensors"
pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, comfy_tiny):
    """The tiny checkpoint and a random full CLIP ViT-L/14 file, written once and linked into every server."""
    from comfyui_models import write_clip
    from kit.checkpoints import write_single_file

    if CURRENT.unavailable():
        pytest.skip(CURRENT.unavailable())
    folder = tmp_path_factory.mktemp("dtype-models")
    write_single_file(comfy_tiny, folder / CHECKPOINT)
    write_clip(folder / VISION, comfy_tiny.text_encoder)
    return folder


def run_case(model_files, unet: str, vae: str, text: str) -> None:
    with ComfyUIServer(CURRENT, flags=(UNET[unet], VAE[vae], TEXT[text])) as comfyui:
        (comfyui.models("checkpoints") / CHECKPOINT).symlink_to(model_files / CHECKPOINT)
        (comfyui.models("clip_vision") / VISION).symlink_to(model_files / VISION)
        Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
        name = f"protobooth_dtype_{unet}_{vae}_{text}"
        graph = training_graph(CHECKPOINT, PHOTO, boxes=(RED_SQUARE,), steps=20, prior_weight=1.0, lora_learning_rate=5e-3,
                               token_init=["init", 0])
        graph.update({
            "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VISION}},
            "init": {"class_type": "ProtoBoothPrototypeInit", "inputs": {
                "clip": ["ckpt", 1], "clip_vision": ["vision", 0], "image": ["photo", 0], "masks": ["masks", 0],
                "tokens": "zqsquare", "class_words": "square", "vectors": 1, "steps": 5, "learning_rate": 0.005,
                "text_projection_file": f"clip_vision/{VISION}"}},
            "save": {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name,
                                                                       "overwrite": False}},
        })
        entry = comfyui.run(graph, timeout=600)
        assert f"model weight dtype torch.{TORCH_NAMES[unet]}" in comfyui.log_text(), comfyui.log_tail()
        first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", entry["outputs"]["train"]["text"][0]).groups())
        assert last < 0.9 * first, (unet, vae, text, first, last)

        check = {
            "ckpt": graph["ckpt"],
            "stock": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                             "lora_name": f"{name}.safetensors", "strength_model": 1.0,
                                                             "strength_clip": 1.0}},
            "load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
            "apply": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                         "concept": ["load", 0], "strength_model": 1.0,
                                                                         "strength_clip": 1.0}},
            **prediction_nodes("stock", ["stock", 0], ["stock", 1], f"a photo of embedding:{name} square on a table"),
            **prediction_nodes("applied", ["apply", 0], ["apply", 1], "a photo of zqsquare square on a table"),
            **prediction_nodes("plain", ["ckpt", 0], ["ckpt", 1], "a photo of zqsquare square on a table"),
        }
        start = len(comfyui.log_text())
        entry = comfyui.run(check, timeout=600)
        assert lora_keys_not_loaded(comfyui.log_text()[start:]) == []
        stock, applied, plain = (prediction(entry, p) for p in ("stock", "applied", "plain"))
        assert np.isfinite(applied).all()
        assert np.abs(stock - applied).max() <= 1e-5
        assert np.abs(plain - applied).max() > 1e-3


@pytest.mark.parametrize("unet, vae, text", [pytest.param(*case, marks=[pytest.mark.slow] if index else [])
                                              for index, case in enumerate(COVERING)],
                         ids=["-".join(c) for c in COVERING])
def test_training_and_stock_loaders_in_each_dtype(model_files, unet, vae, text):
    run_case(model_files, unet, vae, text)


@pytest.mark.slow
@pytest.mark.parametrize("unet, vae, text", EVERY, ids=["-".join(c) for c in EVERY])
def test_every_other_dtype_combination(model_files, unet, vae, text):
    run_case(model_files, unet, vae, text)
