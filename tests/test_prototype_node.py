"""Prototype Init in the real ComfyUI: the graph's CLIP and a CLIP vision file give token vectors that move
towards what CLIP sees; CLIP vision models that do not fit the checkpoint are refused with the fix."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from comfyui_harness import execution_error
from comfyui_models import BLUE_RECTANGLE, RED_SQUARE, two_shapes_photo

PHOTO = "prototype_photo.png"


@pytest.fixture(scope="module")
def photo(comfyui) -> str:
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    return PHOTO


def prototype_graph(checkpoint, sam, photo, vision: dict, tokens="zqsquare, zqbox", class_words="square, box",
                    boxes=(RED_SQUARE, BLUE_RECTANGLE), steps=3) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "sam": {"class_type": "ProtoBoothSAMLoader", "inputs": {"sam_name": sam}},
        "segment": {"class_type": "ProtoBoothSegmentObjects", "inputs": {
            "image": ["photo", 0], "sam": ["sam", 0], "prompts": json.dumps([{"box": list(b)} for b in boxes]),
            "dilate": 0, "feather": 0.0, "multimask": True}},
        "vision": vision,
        "init": {"class_type": "ProtoBoothPrototypeInit", "inputs": {
            "clip": ["ckpt", 1], "clip_vision": ["vision", 0], "image": ["photo", 0], "masks": ["segment", 0],
            "tokens": tokens, "class_words": class_words, "vectors": 2, "steps": steps, "learning_rate": 0.02}},
        "report": {"class_type": "ProtoBoothTestTokenInitReport", "inputs": {"token_init": ["init", 0]}},
    }


def failure(comfyui, graph: dict) -> str:
    entry = comfyui.wait(comfyui.queue(graph), timeout=600)
    assert entry["status"]["status_str"] == "error", "the prompt should have failed"
    return execution_error(entry)


def test_node_is_registered_with_its_widgets(comfyui):
    node = comfyui.object_info("ProtoBoothPrototypeInit")["ProtoBoothPrototypeInit"]
    assert node["display_name"] == "Prototype Init" and node["category"] == "ProtoBooth"
    assert list(node["input"]["required"]) == ["clip", "clip_vision", "image", "masks", "tokens", "class_words",
                                               "vectors", "steps", "learning_rate"]
    assert node["output"] == ["PROTOBOOTH_TOKEN_INIT"] and node["output_name"] == ["token_init"]


def test_token_vectors_move_towards_what_clip_sees(comfyui, comfyui_checkpoint, comfyui_sam, comfyui_clip_vision, photo):
    vision = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": comfyui_clip_vision}}
    log_start = len(comfyui.log_text())

    # one object: the full-size CLIP towers are slow on a CPU (two objects run in the two_objects workflow)
    graph = prototype_graph(comfyui_checkpoint, comfyui_sam, photo, vision, tokens="zqsquare", class_words="square",
                            boxes=(RED_SQUARE,))
    entry = comfyui.run(graph, timeout=600)

    [result] = entry["outputs"]["report"]["token_init"]
    assert (result["token"], result["class_word"], result["method"]) == ("zqsquare", "square", "prototype")
    assert result["shape"] == [2, 768] and result["finite"]
    assert result["cosine_final"] > result["cosine_start"] + 0.01, result
    log = comfyui.log_text()[log_start:]
    # the tiny checkpoint, like real SD1 checkpoints, has no CLIP text projection; the node says what it does then
    assert "Prototype Init: the checkpoint's text encoder has no text projection" in log
    assert "prototype for 'zqsquare' (square): cosine" in log


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("1024 wide", "Prototype Init: the CLIP vision model gives 1024-wide image features but this SD1 checkpoint's "
                      "text encoder gives 768-wide text features; load the CLIP vision file that fits it: CLIP ViT-L/14"),
        ("no projection", "Prototype Init: clip_vision is not a CLIP image encoder with a projection"),
    ],
)
def test_clip_vision_that_does_not_fit_is_refused_with_the_fix(comfyui, comfyui_checkpoint, comfyui_sam, photo, kind, expected):
    vision = {"class_type": "ProtoBoothTestFakeVision", "inputs": {"kind": kind}}
    message = failure(comfyui, prototype_graph(comfyui_checkpoint, comfyui_sam, photo, vision))
    assert expected in message and "InputError" in message


def test_one_token_per_mask(comfyui, comfyui_checkpoint, comfyui_sam, photo):
    vision = {"class_type": "ProtoBoothTestFakeVision", "inputs": {"kind": "1024 wide"}}
    message = failure(comfyui, prototype_graph(comfyui_checkpoint, comfyui_sam, photo, vision, tokens="zqsquare",
                                               class_words="square"))
    assert "Prototype Init: got 2 mask(s) but 1 token(s)" in message
