"""The example workflows (workflows/*.json) and the UI → API converter the tests run them through.

The converter is checked on small synthetic graphs against the frontend's rules; every workflow is
checked against the real server's node definitions; (a), (b) and (c) run end to end in the real ComfyUI
on tiny model files, as do (e) (TextBoost), (f) (attribute transfer) and (h) (the zero-shot object encoder, with a
random encoder file); (d) needs ComfyUI_IPAdapter_plus, which the test ComfyUI cannot run (it predates the
ModelPatcher API that extension uses), so it is checked structurally against that extension's node
definitions. (g), SDXL, runs end to end on the smallest file ComfyUI detects as SDXL (2 GB, written at test time:
slow).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfyui_models import BLUE_RECTANGLE, RED_SQUARE, two_shapes_photo, write_random_encoder
from conftest import ROOT, long_run_on_one_build
from workflow_convert import Widget, WorkflowError, to_api_prompt, widgets_of

WORKFLOWS = ROOT / "workflows"
NAMES = ("one_object", "two_objects", "concept_controlnet", "concept_ipadapter", "textboost_one_object",
         "attribute_transfer", "sdxl_one_object", "zero_shot_encoder")
PHOTO = "workflow_photo.png"
CONCEPT = "protobooth_test_mug"
# Combo inputs that list model or input files: their values are the files a user would have, not the server's.
FILE_INPUTS = {"ckpt_name", "sam_name", "clip_name", "control_net_name", "image", "concept_name", "text_projection_file",
               "encoder_name"}

# ComfyUI_IPAdapter_plus @9d076a3 (2025-02-26), IPAdapterPlus.py: the two nodes concept_ipadapter.json uses,
# as that extension's /object_info entries would show them.
_WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                 "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                 "style and composition", "style transfer precise", "composition precise"]
IPADAPTER_NODES = {
    "IPAdapterUnifiedLoader": {
        "input": {"required": {"model": ["MODEL"], "preset": [[
            "LIGHT - SD1.5 only (low strength)", "STANDARD (medium strength)", "VIT-G (medium strength)",
            "PLUS (high strength)", "PLUS FACE (portraits)", "FULL FACE - SD1.5 only (portraits stronger)"]]},
            "optional": {"ipadapter": ["IPADAPTER"]}},
        "output": ["MODEL", "IPADAPTER"], "output_name": ["model", "ipadapter"], "display_name": "IPAdapter Unified Loader",
    },
    "IPAdapterAdvanced": {
        "input": {"required": {
            "model": ["MODEL"], "ipadapter": ["IPADAPTER"], "image": ["IMAGE"],
            "weight": ["FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}], "weight_type": [_WEIGHT_TYPES],
            "combine_embeds": [["concat", "add", "subtract", "average", "norm average"]],
            "start_at": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
            "end_at": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
            "embeds_scaling": [["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]]},
            "optional": {"image_negative": ["IMAGE"], "attn_mask": ["MASK"], "clip_vision": ["CLIP_VISION"]}},
        "output": ["MODEL"], "output_name": ["MODEL"], "display_name": "IPAdapter Advanced",
    },
}


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


# ------------------------------------------------------------------------------------------------------
# The converter, on synthetic node definitions

INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"]]}},
               "output": ["MODEL", "INT"], "output_name": ["MODEL", "number"]},
    "Sampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 20}],
                                       "sampler": [["euler", "ddim"]]},
                          "optional": {"text": ["STRING", {"multiline": True}], "extra": ["MODEL"]}},
                "output": ["LATENT"], "output_name": ["LATENT"]},
    "Patch": {"input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {"default": 1.0}]}},
              "output": ["MODEL"], "output_name": ["MODEL"]},
    "Picture": {"input": {"required": {"image": [["x.png"], {"image_upload": True}], "mode": [["rgb", "alpha"]]},
                          "optional": {"scale": ["FLOAT", {}]}},
                "output": ["IMAGE"], "output_name": ["IMAGE"]},
    "Choice": {"input": {"required": {"pick": [["p", "q"], {"control_after_generate": True}], "n": ["INT", {}]}},
               "output": [], "output_name": []},
}


def ui_node(node_id, kind, values=(), inputs=(), mode=0, **extra):
    return {"id": node_id, "type": kind, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": node_id, "mode": mode,
            "inputs": [dict(slot) for slot in inputs], "outputs": [], "properties": {}, "widgets_values": list(values), **extra}


def ui_workflow(nodes, links):
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def sampler_graph(*, sampler_inputs=None, patch_mode=0, sampler_values=(7, "fixed", 20, "euler", "hi")):
    """Loader(1) → Patch(2) → Sampler(3), with Loader also feeding Patch's model through a bypass test."""
    nodes = [
        ui_node(1, "Loader", ["a.safetensors"]),
        ui_node(2, "Patch", [0.5], [{"name": "model", "type": "MODEL", "link": 1}], mode=patch_mode),
        ui_node(3, "Sampler", sampler_values, sampler_inputs or [{"name": "model", "type": "MODEL", "link": 2},
                                                                 {"name": "extra", "type": "MODEL", "link": None}]),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"]]
    return ui_workflow(nodes, links)


def test_widgets_follow_input_order_with_frontend_only_companions():
    assert widgets_of(INFO["Sampler"]) == [Widget("seed"), Widget("control_after_generate", False), Widget("steps"),
                                           Widget("sampler"), Widget("text")]
    # the upload button follows the last required input; optional widgets come after it
    assert widgets_of(INFO["Picture"]) == [Widget("image"), Widget("mode"), Widget("upload", False), Widget("scale")]
    assert widgets_of(INFO["Choice"]) == [Widget("pick"), Widget("control_after_generate", False),
                                          Widget("control_filter_list", False), Widget("n")]
    # a server that sends input_order is followed rather than the dict order
    ordered = {"input": {"required": {"model": ["MODEL"], "strength": ["FLOAT", {}], "count": ["INT", {}]}},
               "input_order": {"required": ["count", "model", "strength"]}}
    assert widgets_of(ordered) == [Widget("count"), Widget("strength")]


def test_links_and_widget_values_become_the_api_prompt():
    prompt = to_api_prompt(sampler_graph(), INFO)
    assert prompt == {
        "1": {"class_type": "Loader", "inputs": {"ckpt_name": "a.safetensors"}, "_meta": {"title": "Loader"}},
        "2": {"class_type": "Patch", "inputs": {"strength": 0.5, "model": ["1", 0]}, "_meta": {"title": "Patch"}},
        "3": {"class_type": "Sampler", "inputs": {"seed": 7, "steps": 20, "sampler": "euler", "text": "hi",
                                                  "model": ["2", 0]}, "_meta": {"title": "Sampler"}},
    }


def test_extra_trailing_values_are_ignored_and_missing_ones_refused():
    # an extension's button widget adds a value (null) after the node's own widgets
    prompt = to_api_prompt(sampler_graph(sampler_values=(7, "fixed", 20, "euler", "hi", None)), INFO)
    assert prompt["3"]["inputs"]["text"] == "hi"
    with pytest.raises(WorkflowError, match=r"node 3 \(Sampler\) has 4 widget values for 5 widgets"):
        to_api_prompt(sampler_graph(sampler_values=(7, 20, "euler", "hi")), INFO)


def test_converted_widget_takes_its_link_and_is_left_out_when_unlinked():
    linked = [{"name": "model", "type": "MODEL", "link": 2}, {"name": "seed", "type": "INT", "link": 3, "widget": {"name": "seed"}}]
    workflow = sampler_graph(sampler_inputs=linked)
    workflow["links"].append([3, 1, 1, 3, 1, "INT"])
    assert to_api_prompt(workflow, INFO)["3"]["inputs"]["seed"] == ["1", 1]

    unlinked = [{"name": "model", "type": "MODEL", "link": 2}, {"name": "seed", "type": "INT", "link": None, "widget": {"name": "seed"}}]
    assert "seed" not in to_api_prompt(sampler_graph(sampler_inputs=unlinked), INFO)["3"]["inputs"]


def test_muted_nodes_are_left_out_and_bypassed_nodes_passed_through():
    muted = to_api_prompt(sampler_graph(patch_mode=2), INFO)
    assert set(muted) == {"1", "3"} and "model" not in muted["3"]["inputs"]  # as the frontend: the server will refuse it
    bypassed = to_api_prompt(sampler_graph(patch_mode=4), INFO)
    assert set(bypassed) == {"1", "3"} and bypassed["3"]["inputs"]["model"] == ["1", 0]


def test_frontend_only_nodes():
    workflow = sampler_graph()
    # a Reroute between Patch and Sampler, a PrimitiveNode feeding the converted steps widget, and a Note
    workflow["nodes"] += [ui_node(4, "Reroute", [], [{"name": "", "type": "*", "link": 2}]),
                          ui_node(5, "PrimitiveNode", [33, "fixed"]), ui_node(6, "Note", ["read me"])]
    workflow["links"] += [[3, 4, 0, 3, 0, "MODEL"], [4, 5, 0, 3, 2, "INT"]]
    workflow["nodes"][2]["inputs"] = [{"name": "model", "type": "MODEL", "link": 3},
                                      {"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}}]
    prompt = to_api_prompt(workflow, INFO)
    assert set(prompt) == {"1", "2", "3"}
    assert prompt["3"]["inputs"]["model"] == ["2", 0] and prompt["3"]["inputs"]["steps"] == 33


def test_what_the_converter_refuses():
    with pytest.raises(WorkflowError, match="'Mystery', which this server does not know"):
        to_api_prompt(ui_workflow([ui_node(1, "Mystery")], []), INFO)
    with pytest.raises(WorkflowError, match="schema 0.4"):
        to_api_prompt(dict(sampler_graph(), version=1), INFO)
    dict_values = sampler_graph()
    dict_values["nodes"][0]["widgets_values"] = {"ckpt_name": "a.safetensors"}
    with pytest.raises(WorkflowError, match="saves its widgets as dict"):
        to_api_prompt(dict_values, INFO)
    dangling = sampler_graph()
    dangling["nodes"][2]["inputs"][0]["link"] = 99
    with pytest.raises(WorkflowError, match="link 99"):
        to_api_prompt(dangling, INFO)


# ------------------------------------------------------------------------------------------------------
# The workflow files


@pytest.mark.parametrize("name", NAMES)
def test_workflow_file_is_a_frontend_save(name):
    workflow = load_workflow(name)
    assert workflow["version"] == 0.4
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[target]["inputs"][target_slot]["type"] == kind
    # seeds are kept as they are between runs (the frontend would randomise them after each run otherwise)
    for node in nodes.values():
        if node["type"] == "KSampler" or node["type"].startswith("ProtoBoothTrain"):
            values = node["widgets_values"]
            assert "fixed" in values and isinstance(values[values.index("fixed") - 1], int), node["type"]
    # nodes do not overlap on the canvas (title bar included)
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in nodes.values()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


@pytest.fixture(scope="module")
def server_nodes(comfyui) -> dict:
    return comfyui.object_info()


def test_a_widget_appended_to_a_node_leaves_old_files_converting_with_its_default(server_nodes):
    # How a setting joins a node (engine/train/methods/base.py: Method.widgets): at the end. A workflow saved before
    # fills the widgets it knew by position; the new one keeps its default, here as in the frontend.
    info = copy.deepcopy(server_nodes)
    node = info["ProtoBoothTrainConcept"]
    node["input"]["required"]["new_setting"] = ["FLOAT", {"default": 0.25}]
    if "input_order" in node:
        node["input_order"]["required"].append("new_setting")
    before, after = to_api_prompt(load_workflow("one_object"), server_nodes), to_api_prompt(load_workflow("one_object"), info)
    [train] = [key for key, entry in before.items() if entry["class_type"] == "ProtoBoothTrainConcept"]
    assert after[train]["inputs"] == {**before[train]["inputs"], "new_setting": 0.25}
    assert {key: entry for key, entry in after.items() if key != train} == {k: e for k, e in before.items() if k != train}


@pytest.mark.parametrize("name", ["one_object", "two_objects"])
def test_a_save_with_the_pickers_trailing_null_converts_the_same(server_nodes, name):
    # Before the picker's button said serialize = false to the current frontend, saving there added its value
    # (null) after Segment Objects' widgets; such files must load and run as before.
    workflow = load_workflow(name)
    saved = copy.deepcopy(workflow)
    for node in saved["nodes"]:
        if node["type"] == "ProtoBoothSegmentObjects":
            node["widgets_values"].append(None)
    assert to_api_prompt(saved, server_nodes) == to_api_prompt(workflow, server_nodes)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_fits_the_servers_nodes(server_nodes, name):
    workflow = load_workflow(name)
    extension = IPADAPTER_NODES if name == "concept_ipadapter" else {}
    for kind in extension:
        assert kind not in server_nodes  # else the stubs would hide the real definitions
    info = {**server_nodes, **extension}
    known = {node["type"] for node in workflow["nodes"]} - {"Note"}
    assert known <= set(info), f"unknown node types: {sorted(known - set(info))}"
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for _, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert info[nodes[origin]["type"]]["output"][origin_slot] == kind
        name_in = nodes[target]["inputs"][target_slot]["name"]
        spec = {**info[nodes[target]["type"]]["input"]["required"], **info[nodes[target]["type"]]["input"].get("optional", {})}
        assert spec[name_in][0] == kind, (nodes[target]["type"], name_in)

    prompt = to_api_prompt(workflow, info)
    for node_id, entry in prompt.items():
        required = info[entry["class_type"]]["input"]["required"]
        assert set(required) <= set(entry["inputs"]), (entry["class_type"], set(required) - set(entry["inputs"]))
        for input_name, value in entry["inputs"].items():
            spec = required.get(input_name) or info[entry["class_type"]]["input"]["optional"][input_name]
            if isinstance(spec[0], list) and input_name not in FILE_INPUTS and not isinstance(value, list):
                assert value in spec[0], (entry["class_type"], input_name, value)
    if name == "concept_ipadapter":
        by_type = {entry["class_type"]: node_id for node_id, entry in prompt.items()}
        advanced = prompt[by_type["IPAdapterAdvanced"]]["inputs"]
        assert advanced["model"] == [by_type["IPAdapterUnifiedLoader"], 0]
        assert advanced["ipadapter"] == [by_type["IPAdapterUnifiedLoader"], 1]
        assert (advanced["weight_type"], advanced["embeds_scaling"]) == ("linear", "V only")
        assert prompt[by_type["IPAdapterUnifiedLoader"]]["inputs"]["model"] == [by_type["ProtoBoothApplyConcept"], 0]
        assert prompt[by_type["KSampler"]]["inputs"]["model"] == [by_type["IPAdapterAdvanced"], 0]


# ------------------------------------------------------------------------------------------------------
# Running (a), (b), (c), (e), (f) in the real ComfyUI


def substituted(prompt: dict, changes: dict) -> dict:
    """The prompt with inputs replaced by class type (every replaced input must exist)."""
    prompt = copy.deepcopy(prompt)
    for entry in prompt.values():
        for input_name, value in changes.get(entry["class_type"], {}).items():
            assert input_name in entry["inputs"], (entry["class_type"], input_name)
            entry["inputs"][input_name] = value
    return prompt


@pytest.fixture(scope="module")
def tiny_files(comfyui, comfyui_checkpoint, comfyui_sam, comfyui_clip_vision, comfyui_controlnet) -> dict:
    """The tiny stand-ins for the files a user would have, and small sizes so that CPU runs are quick."""
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    return {
        "CheckpointLoaderSimple": {"ckpt_name": comfyui_checkpoint},
        "ProtoBoothSAMLoader": {"sam_name": comfyui_sam},
        "CLIPVisionLoader": {"clip_name": comfyui_clip_vision},
        "ControlNetLoader": {"control_net_name": comfyui_controlnet},
        "LoadImage": {"image": PHOTO},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
        # the CLIP vision file is a full CLIP, as the published one is: it holds the text projection SD1 lacks
        "ProtoBoothPrototypeInit": {"steps": 2, "text_projection_file": f"clip_vision/{comfyui_clip_vision}"},
        "ProtoBoothTrainConcept": {"steps": 2, "resolution": 64},
        "ProtoBoothTrainTextboost": {"steps": 2, "resolution": 64},
        "ProtoBoothTrainAttribute": {"steps": 2, "resolution": 64},
    }


def run_workflow(comfyui, name: str, changes: dict) -> tuple[dict, dict]:
    prompt = substituted(to_api_prompt(load_workflow(name), comfyui.object_info()), changes)
    return prompt, comfyui.run(prompt, timeout=900)


def check_saved_images(comfyui, prompt: dict, entry: dict) -> int:
    """Every SaveImage wrote its pictures, and none is constant (NaN or inf latents decode to one colour)."""
    count = 0
    for node_id, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        images = entry["outputs"][node_id]["images"]
        assert images, f"SaveImage {node_id} saved nothing"
        for image in images:
            pixels = np.asarray(Image.open(comfyui.output_dir / image["subfolder"] / image["filename"]).convert("RGB"),
                                dtype=np.float32)
            assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0, image["filename"]
            count += 1
    return count


def concept_files(comfyui, name: str) -> list:
    return [comfyui.models("loras") / f"{name}.safetensors", comfyui.models("embeddings") / f"{name}.safetensors"]


@pytest.fixture(scope="module")
def one_object_run(comfyui, tiny_files) -> tuple[dict, dict]:
    changes = dict(tiny_files, ProtoBoothSegmentObjects={"prompts": json.dumps([{"box": list(RED_SQUARE)}])},
                   ProtoBoothSaveConcept={"name": CONCEPT})
    return run_workflow(comfyui, "one_object", changes)


@long_run_on_one_build
def test_one_object_workflow_learns_saves_and_draws_three_scenes(comfyui, one_object_run):
    prompt, entry = one_object_run
    assert check_saved_images(comfyui, prompt, entry) == 3
    assert all(path.is_file() for path in concept_files(comfyui, CONCEPT))


@long_run_on_one_build
def test_two_objects_workflow_draws_both(comfyui, tiny_files):
    name = f"{CONCEPT}_and_rectangle"
    changes = dict(tiny_files, ProtoBoothSaveConcept={"name": name},
                   ProtoBoothSegmentObjects={"prompts": json.dumps([{"box": list(RED_SQUARE)}, {"box": list(BLUE_RECTANGLE)}])})
    prompt, entry = run_workflow(comfyui, "two_objects", changes)
    assert check_saved_images(comfyui, prompt, entry) == 1
    assert all(path.is_file() for path in concept_files(comfyui, name))


@long_run_on_one_build
def test_concept_controlnet_workflow_uses_the_saved_concept(comfyui, tiny_files, one_object_run):
    changes = dict(tiny_files, ProtoBoothLoadConcept={"concept_name": CONCEPT})
    prompt, entry = run_workflow(comfyui, "concept_controlnet", changes)
    assert check_saved_images(comfyui, prompt, entry) == 1


# Slow: the one-object workflow already runs the same nodes' path in the default suite; this one adds only
# the method's node (its stock-loader equivalence runs by default in test_concept_nodes.py).
@pytest.mark.slow
@long_run_on_one_build
def test_textboost_workflow_learns_saves_and_draws_three_scenes(comfyui, tiny_files):
    name = f"{CONCEPT}_textboost"
    changes = dict(tiny_files, ProtoBoothSegmentObjects={"prompts": json.dumps([{"box": list(RED_SQUARE)}])},
                   ProtoBoothSaveConcept={"name": name})
    prompt, entry = run_workflow(comfyui, "textboost_one_object", changes)
    assert check_saved_images(comfyui, prompt, entry) == 3
    lora, embedding = concept_files(comfyui, name)
    assert embedding.is_file() and lora.is_file()
    assert all(key.startswith("lora_te_") for key in safe_open(str(lora), "pt").keys())  # the text encoder's alone


# Slow: the one-object workflow already runs the same nodes' path in the default suite; this one adds only
# the method's node (its stock-loader equivalence runs by default in test_concept_nodes.py).
@pytest.mark.slow
@long_run_on_one_build
def test_attribute_workflow_learns_saves_and_draws_three_transfers(comfyui, tiny_files):
    name = f"{CONCEPT}_attribute"
    changes = dict(tiny_files, ProtoBoothSegmentObjects={"prompts": json.dumps([{"box": list(RED_SQUARE)}])},
                   ProtoBoothSaveConcept={"name": name})
    prompt, entry = run_workflow(comfyui, "attribute_transfer", changes)
    assert check_saved_images(comfyui, prompt, entry) == 3
    lora, embedding = concept_files(comfyui, name)
    assert embedding.is_file()
    assert all(key.startswith("lora_unet_up_blocks_") for key in safe_open(str(lora), "pt").keys())  # the decoder's


@long_run_on_one_build
def test_zero_shot_encoder_workflow_encodes_saves_a_stock_embedding_and_draws_two_scenes(comfyui, tiny_files):
    write_random_encoder(comfyui.models("protobooth_encoders") / "workflow-encoder.safetensors")  # for its ViT-L/14
    name = f"{CONCEPT}_encoded"
    changes = dict(tiny_files, ProtoBoothSegmentObjects={"prompts": json.dumps([{"box": list(RED_SQUARE)}])},
                   ProtoBoothLoadObjectEncoder={"encoder_name": "workflow-encoder.safetensors"},
                   ProtoBoothSaveConcept={"name": name})
    prompt, entry = run_workflow(comfyui, "zero_shot_encoder", changes)
    assert check_saved_images(comfyui, prompt, entry) == 2
    lora, embedding = concept_files(comfyui, name)
    assert not lora.exists()  # this encoder was pretrained without a UNet LoRA
    with safe_open(str(embedding), "pt") as handle:  # K = 4 vectors, as embedding:<name> reads them
        assert {key: handle.get_slice(key).get_shape() for key in handle.keys()} == {"clip_l": [4, 768]}


def sampled(prefix: str, model, clip, vae, text: str) -> dict:
    """A 64-px picture of `text` drawn by stock nodes, saved with `prefix`."""
    return {
        f"{prefix}_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
        f"{prefix}_negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        f"{prefix}_latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}_sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{prefix}_text", 0], "negative": [f"{prefix}_negative", 0],
            "latent_image": [f"{prefix}_latent", 0], "seed": 42, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        f"{prefix}_decode": {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}_sample", 0], "vae": vae}},
        f"{prefix}_save": {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}_decode", 0], "filename_prefix": prefix}},
    }


@pytest.mark.slow  # the SDXL file is 2 GB
@long_run_on_one_build
def test_sdxl_workflow_learns_saves_and_draws_and_stock_loaders_draw_the_same(comfyui, tiny_files, comfyui_sdxl_checkpoint):
    name = f"{CONCEPT}_sdxl"
    changes = dict(tiny_files, CheckpointLoaderSimple={"ckpt_name": comfyui_sdxl_checkpoint}, ProtoBoothSaveConcept={"name": name},
                   ProtoBoothSegmentObjects={"prompts": json.dumps([{"box": list(RED_SQUARE)}])})
    prompt, entry = run_workflow(comfyui, "sdxl_one_object", changes)
    assert check_saved_images(comfyui, prompt, entry) == 3
    lora, embedding = concept_files(comfyui, name)
    assert lora.is_file() and embedding.is_file()
    with safe_open(str(embedding), "pt") as handle:  # both of SDXL's text encoders' halves
        assert {key: handle.get_slice(key).get_shape() for key in handle.keys()} == {"clip_l": [1, 768], "clip_g": [1, 1280]}

    # without ProtoBooth: stock Load LoRA and embedding:<name> draw the picture Apply Concept draws
    ckpt, vae = ["ckpt", 0], ["ckpt", 2]
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_sdxl_checkpoint}},
        "stock": {"class_type": "LoraLoader", "inputs": {"model": ckpt, "clip": ["ckpt", 1], "lora_name": lora.name,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
        "apply": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ckpt, "clip": ["ckpt", 1], "concept": ["load", 0],
                                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        **sampled("sdxl_stock", ["stock", 0], ["stock", 1], vae, f"a photo of embedding:{name} mug on a desk"),
        **sampled("sdxl_applied", ["apply", 0], ["apply", 1], vae, "a photo of zqmug mug on a desk"),
    }
    entry = comfyui.run(graph, timeout=900)
    stock, applied = (np.asarray(Image.open(comfyui.output_dir / image["subfolder"] / image["filename"]))
                      for image in (entry["outputs"][f"sdxl_{kind}_save"]["images"][0] for kind in ("stock", "applied")))
    assert np.array_equal(stock, applied)


def test_the_current_frontend_lists_every_example_workflow_as_a_template(comfyui):
    """The current ComfyUI's template browser reads custom nodes' example folders (example_workflows/ by its
    preference; workflows/, the design card's name, is read too, with only a debug-level rename hint)."""
    if comfyui.build.name != "current":
        pytest.skip("the 2024-03 ComfyUI has no template browser (no /workflow_templates route)")
    pack = "protobooth"
    templates = comfyui._request("GET", "/workflow_templates")
    assert sorted(templates.get(pack, [])) == sorted(p.stem for p in WORKFLOWS.glob("*.json")), templates
    served = comfyui._request("GET", f"/api/workflow_templates/{pack}/one_object.json")
    assert served == json.loads((WORKFLOWS / "one_object.json").read_text())
