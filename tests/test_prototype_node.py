"""Prototype Init in the real ComfyUI: the graph's CLIP, a CLIP vision file and CLIP's text projection give
token vectors that move towards what CLIP sees; a checkpoint without a text projection, projection files
that do not fit and CLIP vision models that do not fit are refused with the fix; the text features come
from the whole text tower (SD2 conditions on its penultimate layer)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from comfyui_harness import failure
from conftest import long_run_on_one_build
from comfyui_models import BLUE_RECTANGLE, RED_SQUARE, two_shapes_photo
from protobooth.engine.fileio import save_safetensors

PHOTO = "prototype_photo.png"
FIX = ("choose the full CLIP model file in text_projection_file (the model.safetensors of openai/clip-vit-large-patch14, "
       "in models/clip_vision: Load CLIP Vision loads the same file, so both can point at it), or leave Prototype Init "
       "out so that training starts from the class word.")


@pytest.fixture(scope="module")
def photo(comfyui) -> str:
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    return PHOTO


@pytest.fixture(scope="module")
def projections(comfyui, comfyui_clip_vision) -> dict[str, str]:
    """text_projection_file choices by what they hold: the full CLIP file, and small files in models/clip."""
    from safetensors import safe_open

    with safe_open(str(comfyui.models("clip_vision") / comfyui_clip_vision), framework="pt") as handle:
        weight = handle.get_tensor("text_projection.weight")  # [768, 768], a Linear weight
    files = {
        "openai layout": {"text_projection": weight.T.contiguous()},  # the same projection, used as text @ P
        "transposed": {"text_projection.weight": weight.T.contiguous()},  # another projection
        "identity": {"text_projection.weight": torch.eye(768)},
        "none": {"text_model.final_layer_norm.weight": torch.ones(768)},  # a text encoder saved without it
        "vit-h": {"text_projection.weight": torch.randn(1024, 1024)},  # another CLIP's
    }
    choices = {"full clip": f"clip_vision/{comfyui_clip_vision}"}
    for kind, tensors in files.items():
        name = f"protobooth-projection-{kind.replace(' ', '-')}.safetensors"
        save_safetensors(tensors, comfyui.models("clip") / name)
        choices[kind] = f"clip/{name}"
    torch.save({"text_projection": weight}, comfyui.models("clip") / "protobooth-projection-pickle.pt")
    return choices


def prototype_graph(checkpoint, sam, photo, vision: dict, projection: str | None = None, tokens="zqsquare, zqbox",
                    class_words="square, box", boxes=(RED_SQUARE, BLUE_RECTANGLE), steps=3) -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "sam": {"class_type": "ProtoBoothSAMLoader", "inputs": {"sam_name": sam}},
        "segment": {"class_type": "ProtoBoothSegmentObjects", "inputs": {
            "image": ["photo", 0], "sam": ["sam", 0], "prompts": json.dumps([{"box": list(b)} for b in boxes]),
            "dilate": 0, "feather": 0.0, "multimask": True}},
        "vision": vision,
    }
    graph.update(init_nodes("", projection, tokens, class_words, steps))
    return graph


def init_nodes(suffix: str, projection: str | None, tokens: str, class_words: str, steps: int, clip=("ckpt", 1)) -> dict:
    """A Prototype Init node (its text_projection_file left out when None) and a report of what it gives."""
    inputs = {"clip": list(clip), "clip_vision": ["vision", 0], "image": ["photo", 0], "masks": ["segment", 0],
              "tokens": tokens, "class_words": class_words, "vectors": 2, "steps": steps, "learning_rate": 0.02}
    if projection is not None:
        inputs["text_projection_file"] = projection
    return {f"init{suffix}": {"class_type": "ProtoBoothPrototypeInit", "inputs": inputs},
            f"report{suffix}": {"class_type": "ProtoBoothTestTokenInitReport", "inputs": {"token_init": [f"init{suffix}", 0]}}}


def loaded_vision(name: str) -> dict:
    return {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": name}}


def test_node_is_registered_with_its_widgets(comfyui, projections):
    node = comfyui.object_info("ProtoBoothPrototypeInit")["ProtoBoothPrototypeInit"]
    assert node["display_name"] == "Prototype Init" and node["category"] == "ProtoBooth"
    assert list(node["input"]["required"]) == ["clip", "clip_vision", "image", "masks", "tokens", "class_words",
                                               "vectors", "steps", "learning_rate"]
    assert list(node["input"]["optional"]) == ["text_projection_file", "clip_vision_g"]
    choices = node["input"]["optional"]["text_projection_file"][0]
    assert choices[0] == "(from the checkpoint)" and set(projections.values()) <= set(choices)
    assert not any(choice.endswith(".pt") for choice in choices)  # pickles are never offered
    assert node["output"] == ["PROTOBOOTH_TOKEN_INIT"] and node["output_name"] == ["token_init"]


@long_run_on_one_build
def test_token_vectors_move_towards_what_clip_sees_in_clips_joint_space(
        comfyui, comfyui_checkpoint, comfyui_sam, comfyui_clip_vision, projections, photo):
    log_start = len(comfyui.log_text())
    # one object: the full-size CLIP towers are slow on a CPU (two objects run in the two_objects workflow);
    # one prompt, so the checkpoint, the CLIP vision file and the masks are loaded once for all three nodes
    graph = prototype_graph(comfyui_checkpoint, comfyui_sam, photo, loaded_vision(comfyui_clip_vision),
                            projections["full clip"], tokens="zqsquare", class_words="square", boxes=(RED_SQUARE,))
    for suffix, kind in (("_openai_layout", "openai layout"), ("_transposed", "transposed")):
        graph.update(init_nodes(suffix, projections[kind], "zqsquare", "square", 3))
    # conditioning on the penultimate layer (as SD2 does) leaves CLIP's text features, from the last, as they are
    graph["last_layer"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["ckpt", 1], "stop_at_clip_layer": -2}}
    graph.update(init_nodes("_penultimate", projections["full clip"], "zqsquare", "square", 3, clip=("last_layer", 0)))
    entry = comfyui.run(graph, timeout=900)

    [result] = entry["outputs"]["report"]["token_init"]
    assert (result["token"], result["class_word"], result["method"]) == ("zqsquare", "square", "prototype")
    assert result["shape"] == [2, 768] and result["finite"]
    assert result["cosine_final"] > result["cosine_start"] + 0.01, result
    # the same projection kept the other way round (OpenAI/open_clip files) gives the same search
    [same] = entry["outputs"]["report_openai_layout"]["token_init"]
    assert same["vectors"] == result["vectors"] and same["cosine_start"] == result["cosine_start"]
    # the projection is applied: another one moves the text features elsewhere, so the search ends elsewhere
    [other] = entry["outputs"]["report_transposed"]["token_init"]
    assert other["finite"] and other["vectors"] != result["vectors"]
    assert abs(other["cosine_start"] - result["cosine_start"]) > 1e-4, (other, result)
    [penultimate] = entry["outputs"]["report_penultimate"]["token_init"]
    assert penultimate["vectors"] == result["vectors"]
    log = comfyui.log_text()[log_start:]
    assert f"Prototype Init: text projection [768, 768] read from {projections['full clip']}" in log
    assert "prototype for 'zqsquare' (square): cosine" in log


def test_checkpoint_without_a_text_projection_needs_the_clip_file(comfyui, comfyui_checkpoint, comfyui_sam,
                                                                  comfyui_clip_vision, photo):
    # the tiny checkpoint, like real SD1 checkpoints, has no CLIP text projection; no file is chosen
    graph = prototype_graph(comfyui_checkpoint, comfyui_sam, photo, loaded_vision(comfyui_clip_vision))
    message = failure(comfyui, graph)
    assert ("Prototype Init: this SD1 checkpoint holds no CLIP text projection (SD1 checkpoints can leave it out, and "
            "ComfyUI then holds an identity or unset matrix in its place), so its text features are not in CLIP's joint "
            f"space with the image features; {FIX}") in message and "InputError" in message


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("identity", "Prototype Init: text_projection_file: the text projection in protobooth-projection-identity"
                     ".safetensors is an identity matrix, not CLIP's (a text encoder saved without its projection); "),
        ("none", "Prototype Init: text_projection_file: protobooth-projection-none.safetensors holds no CLIP text "
                 "projection (neither 'text_projection.weight', as Hugging Face CLIPModel files keep it, nor "
                 "'text_projection', as OpenAI/open_clip files do), so it is not a full CLIP model file; "),
        ("vit-h", "Prototype Init: text_projection_file: protobooth-projection-vit-h.safetensors holds a "
                  "text_projection.weight of shape [1024, 1024], but this text encoder is 768 wide, which needs "
                  "[projection width, 768] (Hugging Face CLIPModel layout): the file belongs to another CLIP model; "),
    ],
)
def test_projection_files_that_do_not_fit_are_refused_with_the_fix(comfyui, comfyui_checkpoint, comfyui_sam,
                                                                    comfyui_clip_vision, projections, photo, kind, expected):
    graph = prototype_graph(comfyui_checkpoint, comfyui_sam, photo, loaded_vision(comfyui_clip_vision), projections[kind])
    message = failure(comfyui, graph)
    assert expected + FIX in message and "InputError" in message


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("1024 wide", "Prototype Init: the CLIP vision model gives 1024-wide image features but this SD1 checkpoint's "
                      "text encoder gives 768-wide text features (through the text projection clip_vision/"
                      "protobooth-random-clip-vit-l-14.safetensors); load the CLIP vision file that fits it, with the "
                      "text projection of the same CLIP model: CLIP ViT-L/14"),
        ("no projection", "Prototype Init: clip_vision is not a CLIP image encoder with a projection"),
    ],
)
def test_clip_vision_that_does_not_fit_is_refused_with_the_fix(comfyui, comfyui_checkpoint, comfyui_sam, projections,
                                                               photo, kind, expected):
    vision = {"class_type": "ProtoBoothTestFakeVision", "inputs": {"kind": kind}}
    message = failure(comfyui, prototype_graph(comfyui_checkpoint, comfyui_sam, photo, vision, projections["full clip"]))
    assert expected in message and "InputError" in message


def test_one_token_per_mask(comfyui, comfyui_checkpoint, comfyui_sam, photo):
    vision = {"class_type": "ProtoBoothTestFakeVision", "inputs": {"kind": "1024 wide"}}
    message = failure(comfyui, prototype_graph(comfyui_checkpoint, comfyui_sam, photo, vision, tokens="zqsquare",
                                               class_words="square"))
    assert "Prototype Init: got 2 mask(s) but 1 token(s)" in message


@pytest.mark.parametrize(("family", "last_layer", "conditioning_layers"), [("sd2", -1, 3), ("sd1", -2, 3), ("sd1", -1, 4)])
def test_text_features_come_from_the_whole_tower_whatever_the_conditioning_uses(comfyui, family, last_layer,
                                                                                conditioning_layers):
    # A small ComfyUI text encoder of 4 layers with a text projection (the harness has no SD2 checkpoint: ComfyUI
    # builds SD2's text encoder at OpenCLIP-H's full size). SD2 conditions on its penultimate layer, and so does
    # SD1 after CLIPSetLastLayer -2; CLIP's joint-space text features come from the last layer.
    graph = {"tower": {"class_type": "ProtoBoothTestTextTower", "inputs": {"family": family, "last_layer": last_layer}}}
    [facts] = comfyui.run(graph, timeout=300)["outputs"]["tower"]["facts"]
    assert facts["conditioning"]["layers"] == conditioning_layers and facts["all"]["layers"] == 4
    assert facts["conditioning"]["state_gap"] < 1e-4  # the conditioning view still gives ComfyUI's conditioning
    assert facts["all"]["feature_gap"] < 1e-5  # Prototype Init's text features are ComfyUI's projected pooled output
    if conditioning_layers < 4:
        assert facts["conditioning"]["feature_gap"] > 1e-3  # what the penultimate layer would have given instead
