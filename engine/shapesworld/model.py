"""The embedded default model: ShapesWorld, a small text-to-image world trained here from scratch.

Stable Diffusion 1.x layout and classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the real CLIP
BPE tokenizer) at 32x32 px, stored as fp16 safetensors in a diffusers folder inside the package; the
CLIP vision tower it was trained with sits beside it for the prototype step. It draws flat shapes on
plain backgrounds from captions like "a photo of a red circle on the left, gray background". How it was
made and how well it follows captions: benchmarks/shapesworld/ (train_world.py, results/).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

MODEL_DIR = Path(__file__).parents[1] / "data" / "shapesworld"
GUIDANCE = 3.0  # classifier-free guidance the world model was measured with
SAMPLER_STEPS = 25
# Its object encoder, pretrained on the world's pretraining instances (never the benchmark's held-out ones) with
# `protobooth pretrain-encoder`; what `protobooth encode --model shapesworld` uses unless told otherwise.
OBJECT_ENCODER_FILE = MODEL_DIR / "object_encoder.safetensors"


def _folder() -> Path:
    if not (MODEL_DIR / "model_index.json").is_file():
        raise InputError(f"the ShapesWorld model is missing from {MODEL_DIR}; reinstall ProtoBooth, or rebuild it with "
                         "python benchmarks/shapesworld/train_world.py all (from a source checkout).")
    return MODEL_DIR


def load_shapesworld(device="cpu", dtype=None):
    """The ShapesWorld diffusion model as the engine's DiffusionModel (fp32 unless `dtype` says)."""
    from ..models.loading import load_model

    model = load_model(_folder(), device=device, **({"dtype": dtype} if dtype is not None else {}))
    model.name = "shapesworld"
    return model


def clip_towers(text_encoder=None, device="cpu"):
    """ClipTowers for the prototype step: the world's CLIP vision tower and, as text tower, its text encoder.

    The world's CLIP was trained with an identity text projection, so the pooled text state is already
    in the joint space (text_projection None).
    """
    from transformers import CLIPVisionModelWithProjection

    from ..prototype import ClipTowers

    if text_encoder is None:
        text_encoder = load_shapesworld(device).text_encoder
    vision = CLIPVisionModelWithProjection.from_pretrained(_folder() / "clip_vision", local_files_only=True,
                                                           variant="fp16", dtype="float32").to(device).eval()
    return ClipTowers(text_model=text_encoder, text_projection=None, vision_model=vision.vision_model,
                      visual_projection=vision.visual_projection, image_size=vision.config.image_size)
