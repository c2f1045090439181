"""SAM Loader and Segment Objects in the real ComfyUI: listing, loading, masks in prompt order, clear errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_harness import failure
from comfyui_models import two_shapes_photo

PHOTO = "two_shapes.png"
# the blue rectangle by its box, then the red square by clicks: the reverse of their order in the photo
PROMPTS = [{"box": [30, 36, 58, 60]}, {"positive": [[18, 18]], "negative": [[2, 60]]}]


@pytest.fixture(scope="module")
def photo(comfyui) -> str:
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    return PHOTO


def segment_graph(sam: str, photo: str, prompts, prefix: str, batch: int = 1) -> dict:
    graph = {
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "sam": {"class_type": "ProtoBoothSAMLoader", "inputs": {"sam_name": sam}},
        "segment": {"class_type": "ProtoBoothSegmentObjects", "inputs": {
            "image": ["photo", 0], "sam": ["sam", 0], "prompts": prompts if isinstance(prompts, str) else json.dumps(prompts),
            "dilate": 0, "feather": 0.0, "multimask": True}},
        "masks": {"class_type": "MaskToImage", "inputs": {"mask": ["segment", 0]}},
        "save_masks": {"class_type": "SaveImage", "inputs": {"images": ["masks", 0], "filename_prefix": f"{prefix}_mask"}},
        "save_preview": {"class_type": "SaveImage", "inputs": {"images": ["segment", 1], "filename_prefix": f"{prefix}_preview"}},
    }
    if batch > 1:
        graph["batch"] = {"class_type": "ImageBatch", "inputs": {"image1": ["photo", 0], "image2": ["photo", 0]}}
        graph["segment"]["inputs"]["image"] = ["batch", 0]
    return graph


def saved(comfyui, entry: dict, node: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(comfyui.output_dir / image["subfolder"] / image["filename"]).convert("RGB"))
            for image in entry["outputs"][node]["images"]]


def test_nodes_are_registered_with_their_widgets(comfyui):
    info = comfyui.object_info()
    segment = info["ProtoBoothSegmentObjects"]
    assert segment["category"] == "ProtoBooth" and segment["display_name"] == "Segment Objects"
    assert list(segment["input"]["required"]) == ["image", "sam", "prompts", "dilate", "feather", "multimask"]
    assert segment["output"] == ["MASK", "IMAGE"] and segment["output_name"] == ["masks", "preview"]
    # the frontend would expand {...|...} in multiline text and so break the JSON
    assert segment["input"]["required"]["prompts"][1]["dynamicPrompts"] is False
    assert info["ProtoBoothSAMLoader"]["output"] == ["PROTOBOOTH_SAM"]
    assert info["ProtoBoothSAMLoader"]["display_name"] == "SAM Loader (ProtoBooth)"


def test_sam_loader_lists_the_file_and_segment_objects_gives_masks_in_prompt_order(comfyui, comfyui_sam, photo):
    from protobooth.engine.segment import Segmenter, load_sam

    # A copy under a name of its own: ComfyUI reuses a loader's cached output across prompts, and an
    # earlier test may already have loaded the original file, so only a new name makes this run load.
    fresh = "order-test-sam.pth"
    shutil.copyfile(comfyui.models("sams") / comfyui_sam, comfyui.models("sams") / fresh)
    listed = comfyui.object_info("ProtoBoothSAMLoader")["ProtoBoothSAMLoader"]["input"]["required"]["sam_name"][0]
    assert comfyui_sam in listed and fresh in listed
    log_start = len(comfyui.log_text())

    entry = comfyui.run(segment_graph(fresh, photo, PROMPTS, "order"), timeout=300)

    # the file's name says nothing about its size: the architecture came from the weights
    assert "loaded SAM custom (ViT 32 wide, 2 blocks" in comfyui.log_text()[log_start:]
    masks = [image[..., 0] / 255.0 for image in saved(comfyui, entry, "save_masks")]
    segmenter = Segmenter(load_sam(comfyui.models("sams") / comfyui_sam))
    segmenter.set_image(two_shapes_photo())
    expected = [mask.numpy() for mask in segmenter.segment(PROMPTS)]
    assert len(masks) == 2 and not np.array_equal(*expected)
    for mask, reference in zip(masks, expected):
        assert np.mean(np.abs(mask - reference) > 0.5) < 0.01
    [preview] = saved(comfyui, entry, "save_preview")
    assert preview.shape == (64, 64, 3) and not np.array_equal(preview, two_shapes_photo())


def test_a_batch_of_images_is_refused(comfyui, comfyui_sam, photo):
    message = failure(comfyui, segment_graph(comfyui_sam, photo, PROMPTS, "batch", batch=2))
    assert "Segment Objects: image is a batch of 2 images; give exactly one photo" in message


@pytest.mark.parametrize(
    "prompts, expected",
    [
        ('[{"box": [8, 8, 40, 40]}, {"box": [1, 2]}]', "Segment Objects: prompts[1] (object 2): box must be 4 finite numbers"),
        ('[{"box": [8, 8, 40, 40]}, {"box": [8, 8, 40, 40]]', "Segment Objects: prompts are not valid JSON"),
        ('[{"box": [8, 8, 80, 40]}]', "Segment Objects: prompts[0] (object 1): box [8, 8, 80, 40] reaches outside the 64x64 image"),
        ('[{"points": [[10, 10]], "labels": [1, 0]}]', "Segment Objects: prompts[0].labels must hold one label per entry"),
    ],
)
def test_bad_prompts_are_refused_naming_the_entry(comfyui, comfyui_sam, photo, prompts, expected):
    message = failure(comfyui, segment_graph(comfyui_sam, photo, prompts, "bad"))
    assert expected in message
    assert "InputError" in message


def test_sam_folder_keeps_paths_registered_before(comfyui):
    # The harness registers its models/sams through extra_model_paths.yaml before the pack loads; the pack
    # adds ComfyUI's own models/sams (here the same folder: the launcher moves models_dir into the scratch
    # folder) without replacing the list or listing a folder twice.
    folder = comfyui.probe()["sams_folder"]
    assert folder["paths"][0] == str(comfyui.models("sams"))
    assert str(Path(folder["models_dir"]) / "sams") in folder["paths"]
    assert len(set(folder["paths"])) == len(folder["paths"])
    assert {".pth", ".safetensors"} <= set(folder["extensions"])
