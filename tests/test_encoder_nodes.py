"""Load Object Encoder and Encode Object in the real ComfyUI: the graph's CLIP vision model and the encoder give the
vectors the engine computes; the concept saves as stock files, and its token_init starts Train Concept."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from comfyui_harness import failure
from conftest import long_run_on_one_build
from comfyui_models import BLUE_RECTANGLE, RED_SQUARE, two_shapes_photo, vit_l_14_vision_config, write_random_encoder
from protobooth.engine.encoder.encode import object_vectors
from protobooth.engine.encoder.model import ObjectEncoder
from protobooth.engine.prototype import ClipTowers
from protobooth.engine.text.tokenizer import clip_tokenizer

PHOTO = "encoder_photo.png"
ENCODER = "protobooth-random-encoder.safetensors"


@pytest.fixture(scope="module")
def encoder(comfyui) -> ObjectEncoder:
    """A random encoder for the CLIP ViT-L/14 file, and the photo."""
    encoder = write_random_encoder(comfyui.models("protobooth_encoders") / ENCODER)
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    return encoder


def encode_graph(checkpoint, clip_vision, tokens="zqsquare, zqbox", class_words="square, box") -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
        "masks": {"class_type": "ProtoBoothTestBoxMasks", "inputs": {
            "image": ["photo", 0], "boxes": json.dumps([RED_SQUARE, BLUE_RECTANGLE])}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "load": {"class_type": "ProtoBoothLoadObjectEncoder", "inputs": {"encoder_name": ENCODER}},
        "encode": {"class_type": "ProtoBoothEncodeObject", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "clip_vision": ["vision", 0], "encoder": ["load", 0],
            "image": ["photo", 0], "masks": ["masks", 0], "tokens": tokens, "class_words": class_words}},
        "report": {"class_type": "ProtoBoothTestTokenInitReport", "inputs": {"token_init": ["encode", 1]}},
        "save": {"class_type": "ProtoBoothSaveConcept", "inputs": {
            "concept": ["encode", 0], "name": "protobooth_encoded", "overwrite": True}},
    }


def engine_vectors(encoder, clip_vision_path, text_encoder) -> list[torch.Tensor]:
    """What the engine computes from the same photo, masks and CLIP file (transformers' vision tower)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(vit_l_14_vision_config())
    vision.load_state_dict({k: v.float() for k, v in load_file(clip_vision_path).items()
                            if k.startswith(("vision_model.", "visual_projection."))}, strict=False)
    towers = ClipTowers(None, None, vision.vision_model.eval(), vision.visual_projection, 224)
    picture = torch.from_numpy(two_shapes_photo()).permute(2, 0, 1).float() / 255
    masks = []
    for left, top, right, bottom in (RED_SQUARE, BLUE_RECTANGLE):
        mask = torch.zeros(64, 64)
        mask[top:bottom, left:right] = 1
        masks.append(mask)
    with torch.no_grad():
        return object_vectors(encoder, lambda crop: towers.vision_model(pixel_values=towers.preprocess(crop)).last_hidden_state,
                              text_encoder, clip_tokenizer(), picture, masks, ["square", "box"])


@long_run_on_one_build  # the pack's code over the same ComfyUI CLIP vision modules in both builds
def test_encode_object_gives_the_engines_vectors_as_a_stock_concept(comfyui, comfyui_checkpoint, comfyui_clip_vision,
                                                                    comfy_tiny, encoder):
    entry = comfyui.run(encode_graph(comfyui_checkpoint, comfyui_clip_vision), timeout=600)
    found = entry["outputs"]["report"]["token_init"]
    assert [f["token"] for f in found] == ["zqsquare", "zqbox"] and {f["method"] for f in found} == {"encoder"}
    expected = engine_vectors(encoder, comfyui.models("clip_vision") / comfyui_clip_vision, comfy_tiny.text_encoder)
    for entry_found, vectors in zip(found, expected):
        got = torch.tensor(entry_found["vectors"]).view(4, 768)
        # ComfyUI rounds the resized crop to 8 bits and runs the fp16 file's tower its own way: close, not equal
        assert (got - vectors).abs().max() < 0.05 * vectors.abs().max(), (got - vectors).abs().max()
    from safetensors.torch import load_file

    stock = load_file(comfyui.models("embeddings") / "protobooth_encoded_zqsquare.safetensors")
    assert torch.equal(stock["clip_l"], torch.tensor(found[0]["vectors"]).view(4, 768))


def test_encode_object_refuses_a_clip_vision_the_encoder_was_not_pretrained_with(comfyui, comfyui_checkpoint, encoder):
    graph = encode_graph(comfyui_checkpoint, "unused")
    graph["vision"] = {"class_type": "ProtoBoothTestFakeVision", "inputs": {"kind": "768 wide"}}
    error = failure(comfyui, graph)
    assert "Encode Object: encoder protobooth-random-encoder.safetensors reads 1024-wide CLIP vision features but this" \
           " CLIP vision tower gives 768-wide ones" in error, error
