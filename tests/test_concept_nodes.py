"""Train, Save, Load and Apply Concept in the real ComfyUI, on the tiny generated checkpoint.

Training runs at 64 px (8x8 latents) for a few steps: these tests check wiring, equivalence and safety, not
quality (benchmarks/shapesworld measures quality).
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfyui_harness import execution_error, failure
from conftest import long_run_on_one_build
from comfyui_models import BLUE_RECTANGLE, RED_SQUARE, two_shapes_photo

PHOTO = "concept_photo.png"
LATENT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
NODES = {
    "ProtoBoothTrainConcept": ["model", "clip", "vae", "image", "masks", "tokens", "class_words", "steps",
                               "lora_learning_rate", "token_learning_rate", "lora_rank", "prior_weight", "background_weight",
                               "resolution", "seed"],
    "ProtoBoothTrainTextboost": ["model", "clip", "vae", "image", "masks", "tokens", "class_words", "steps",
                                 "text_lora_learning_rate", "token_learning_rate", "text_lora_rank", "knowledge_weight",
                                 "augment_probability", "resolution", "seed"],
    "ProtoBoothTrainAttribute": ["model", "clip", "vae", "image", "masks", "tokens", "class_words", "steps",
                                 "hyper_learning_rate", "token_learning_rate", "attribute", "layers", "resolution", "seed"],
    "ProtoBoothSaveConcept": ["concept", "name", "overwrite"],
    "ProtoBoothLoadConcept": ["concept_name"],
    "ProtoBoothApplyConcept": ["model", "clip", "concept", "strength_model", "strength_clip"],
}


@pytest.fixture(scope="module")
def photo(comfyui) -> str:
    Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
    return PHOTO


def training_graph(checkpoint, photo, boxes=(RED_SQUARE,), tokens="zqsquare", class_words="square", steps=3,
                   prior_weight=0.0, train_id="train", **settings) -> dict:
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "masks": {"class_type": "ProtoBoothTestBoxMasks", "inputs": {"image": ["photo", 0], "boxes": json.dumps(boxes)}},
        train_id: {"class_type": "ProtoBoothTrainConcept", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["photo", 0], "masks": ["masks", 0],
            "tokens": tokens, "class_words": class_words, "steps": steps, "lora_learning_rate": 1e-3,
            "token_learning_rate": 5e-3, "lora_rank": 4, "prior_weight": prior_weight, "background_weight": 0.0,
            "resolution": 64, "seed": 7, **settings}},
        "curve": {"class_type": "PreviewImage", "inputs": {"images": [train_id, 3]}},
    }
    return graph


def textboost_graph(checkpoint, photo, tokens="zqsquare", class_words="square", steps=3) -> dict:
    """Train Concept (TextBoost) on the photo's red square, at a learning rate that moves a tiny model in 3 steps."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "masks": {"class_type": "ProtoBoothTestBoxMasks", "inputs": {"image": ["photo", 0], "boxes": json.dumps([RED_SQUARE])}},
        "train": {"class_type": "ProtoBoothTrainTextboost", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["photo", 0], "masks": ["masks", 0],
            "tokens": tokens, "class_words": class_words, "steps": steps, "text_lora_learning_rate": 5e-3,
            "token_learning_rate": 5e-3, "text_lora_rank": 4, "knowledge_weight": 0.1, "augment_probability": 0.5,
            "resolution": 64, "seed": 7}},
    }


def digest_node(model, clip, after=None) -> dict:
    inputs = {"model": model, "clip": clip, **({"after": after} if after else {})}
    return {"class_type": "ProtoBoothTestWeightsDigest", "inputs": inputs}


def prediction_nodes(prefix: str, model, clip, text: str) -> dict:
    return {
        f"{prefix}_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
        f"{prefix}_predict": {"class_type": "ProtoBoothTestUNetPrediction", "inputs": {
            "model": model, "conditioning": [f"{prefix}_text", 0], "latent": json.dumps(LATENT.tolist()), "timestep": 500}},
    }


def prediction(entry, prefix: str) -> np.ndarray:
    return np.array(entry["outputs"][f"{prefix}_predict"]["prediction"][0])


def weights_digest(comfyui, checkpoint: str) -> dict:
    """The checkpoint's MODEL/CLIP digest (ProtoBoothTestWeightsDigest), in a prompt of its own."""
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
             "digest": digest_node(["ckpt", 0], ["ckpt", 1])}
    return comfyui.run(graph)["outputs"]["digest"]["facts"][0]


def lora_keys_not_loaded(log: str) -> list[str]:
    """ComfyUI's complaints about LoRA keys it found no weight for (a LoRA that silently does less)."""
    return [line for line in log.splitlines() if "lora key not loaded" in line]


def test_nodes_are_registered_with_their_widgets(comfyui):
    info = comfyui.object_info()
    for node, inputs in NODES.items():
        assert info[node]["category"] == "ProtoBooth"
        assert list(info[node]["input"]["required"]) == inputs, node
    assert list(info["ProtoBoothTrainConcept"]["input"]["optional"]) == [
        "token_init", "preview_every", "gradient_checkpointing", "offload_frozen", "recompose", "recompose_resize",
        "recompose_copies", "recompose_companions", "class_prompt", "attention_weight"]
    class_prompt = info["ProtoBoothTrainConcept"]["input"]["optional"]["class_prompt"]
    assert class_prompt[0] == "STRING" and class_prompt[1]["default"] == "a photo of a {}"
    recompose = info["ProtoBoothTrainConcept"]["input"]["optional"]["recompose"]
    assert recompose[0] == "FLOAT" and (recompose[1]["default"], recompose[1]["min"], recompose[1]["max"]) == (0.0, 0, 1)
    assert info["ProtoBoothTrainConcept"]["output"] == ["MODEL", "CLIP", "PROTOBOOTH_CONCEPT", "IMAGE"]
    assert info["ProtoBoothApplyConcept"]["output"] == ["MODEL", "CLIP"]
    assert info["ProtoBoothSaveConcept"]["output_node"] is True


def test_views_share_comfyuis_tensors_and_compute_what_diffusers_does(comfyui, comfyui_checkpoint, photo):
    from protobooth.engine.models.loading import load_model

    graph = training_graph(comfyui_checkpoint, photo)
    del graph["train"], graph["masks"]
    graph["view"] = {"class_type": "ProtoBoothTestViewOutputs", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["photo", 0],
        "latent": json.dumps(LATENT.tolist()), "prompt": "a photo of a red square"}}
    seen = comfyui.run(graph, timeout=600)["outputs"]["view"]["outputs"][0]
    assert seen["unet_shares_storage"] is True

    model = load_model(comfyui.models("checkpoints") / comfyui_checkpoint)
    with torch.no_grad():
        ids = model.tokenizer(["a photo of a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = model.text_encoder(input_ids=ids)[0]
        expected = model.unet(LATENT, 500, encoder_hidden_states=states).sample
        pixels = torch.from_numpy(two_shapes_photo()).float().div(255).movedim(-1, 0)[None] * 2 - 1
        latent_mean = model.vae.encode(pixels).latent_dist.mean
    assert np.array(seen["states"]).shape == (77 * 768,)
    assert np.abs(np.array(seen["states"]) - states.flatten().numpy()).max() <= 1e-4
    assert np.abs(np.array(seen["prediction"]) - expected.flatten().numpy()).max() <= 1e-4
    assert np.abs(np.array(seen["latent_mean"]) - latent_mean.flatten().numpy()).max() <= 1e-3
    assert seen["fingerprint"] == model.fingerprint


def test_training_in_the_graph_leaves_its_inputs_untouched_and_reuses_its_result(comfyui, comfyui_checkpoint, photo):
    before = comfyui.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_checkpoint}},
                          "digest": digest_node(["ckpt", 0], ["ckpt", 1])})["outputs"]["digest"]["facts"][0]
    graph = training_graph(comfyui_checkpoint, photo, prior_weight=1.0)
    graph.update({
        "inputs_after": digest_node(["ckpt", 0], ["ckpt", 1], after=["train", 2]),
        "outputs": digest_node(["train", 0], ["train", 1]),
        "saved_curve": {"class_type": "SaveImage", "inputs": {"images": ["train", 3], "filename_prefix": "loss_curve"}},
        **prediction_nodes("trained", ["train", 0], ["train", 1], "a photo of zqsquare square on a table"),
    })
    entry = comfyui.run(graph, timeout=600)
    after = entry["outputs"]["inputs_after"]["facts"][0]
    assert after == before  # same weights, no patches, the stock tokenizer
    assert before["model_patches"] == 0 and before["tokenizer"] == "SD1Tokenizer"
    trained = entry["outputs"]["outputs"]["facts"][0]
    assert trained["model_patches"] > 0 and trained["tokenizer"] == "ConceptTokenizer"
    assert np.isfinite(prediction(entry, "trained")).all()
    curve = entry["outputs"]["saved_curve"]["images"][0]
    assert Image.open(comfyui.output_dir / curve["subfolder"] / curve["filename"]).size == (512, 256)
    summary = entry["outputs"]["train"]["text"][0]
    assert "zqsquare: 3 steps" in summary and "memory added by training" in summary
    print("Train Concept summary:", summary)  # the measured memory, shown with pytest -rP
    trainings = comfyui.log_text().count("Train Concept: zqsquare: 3 steps")

    # Same inputs under another node id: ComfyUI runs the node again, the node reuses its result.
    again = comfyui.run(training_graph(comfyui_checkpoint, photo, prior_weight=1.0, train_id="train_again"), timeout=600)
    assert again["outputs"]["train_again"]["text"][0] == summary
    assert comfyui.log_text().count("Train Concept: zqsquare: 3 steps") == trainings
    if comfyui.build.name == "2024-03":  # the current ComfyUI's own cache answers before the node runs
        assert "reusing its result" in comfyui.log_text()


@long_run_on_one_build  # the pack's training code over the same ComfyUI modules in both builds
def test_the_memory_switches_are_optional_inputs_that_keep_the_result(comfyui, comfyui_checkpoint, photo):
    """gradient_checkpointing and offload_frozen trade time for memory and nothing else; as optional inputs they leave
    graphs saved before them valid (every other test here leaves them out)."""
    predictions = {}
    for name, switches in (("plain", {}), ("saving", {"gradient_checkpointing": True, "offload_frozen": True})):
        graph = training_graph(comfyui_checkpoint, photo, train_id=f"train_{name}", **switches)
        graph.update(prediction_nodes(name, [f"train_{name}", 0], [f"train_{name}", 1], "a photo of zqsquare square"))
        predictions[name] = prediction(comfyui.run(graph, timeout=600), name)
    assert "the UNet recomputes its activations" in comfyui.log_text()
    assert np.abs(predictions["plain"] - predictions["saving"]).max() <= 1e-5


def test_saved_files_give_stock_loaders_the_same_result_as_apply_concept(comfyui, comfyui_checkpoint, photo):
    name = "protobooth_test_square"
    graph = training_graph(comfyui_checkpoint, photo)
    graph["save"] = {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name, "overwrite": True}}
    comfyui.run(graph, timeout=600)
    files = [comfyui.models(folder) / f"{name}.safetensors" for folder in ("loras", "embeddings")]
    assert all(path.is_file() for path in files)
    assert name in comfyui.object_info("ProtoBoothLoadConcept")["ProtoBoothLoadConcept"]["input"]["required"]["concept_name"][0]

    graph = training_graph(comfyui_checkpoint, photo)  # the same training again: the node's cache answers
    graph.update({
        "stock": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": f"{name}.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
        "apply": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "concept": ["load", 0],
                                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        **prediction_nodes("stock", ["stock", 0], ["stock", 1], f"a photo of embedding:{name} square on a table"),
        **prediction_nodes("applied", ["apply", 0], ["apply", 1], "a photo of zqsquare square on a table"),
        **prediction_nodes("in_graph", ["train", 0], ["train", 1], "a photo of zqsquare square on a table"),
        **prediction_nodes("plain", ["ckpt", 0], ["ckpt", 1], "a photo of zqsquare square on a table"),
    })
    log_start = len(comfyui.log_text())
    entry = comfyui.run(graph, timeout=600)
    assert lora_keys_not_loaded(comfyui.log_text()[log_start:]) == []
    stock, applied, in_graph, plain = (prediction(entry, p) for p in ("stock", "applied", "in_graph", "plain"))
    assert np.abs(stock - applied).max() <= 1e-5
    assert np.abs(in_graph - applied).max() <= 1e-5  # Train Concept's own output is Apply Concept's
    assert np.abs(plain - applied).max() > 1e-3  # the concept changes the prediction

    # Saving again under the same name needs overwrite.
    graph = training_graph(comfyui_checkpoint, photo)
    graph["save"] = {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name, "overwrite": False}}
    stamps = [path.stat().st_mtime_ns for path in files]
    assert "already exist" in failure(comfyui, graph)
    assert [path.stat().st_mtime_ns for path in files] == stamps


def test_a_textboost_concept_patches_the_clip_and_stock_loaders_give_what_apply_concept_gives(comfyui, comfyui_checkpoint,
                                                                                              photo):
    name = "protobooth_test_textboost"
    graph = textboost_graph(comfyui_checkpoint, photo)
    graph["save"] = {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name, "overwrite": True}}
    graph.update({
        "load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
        "stock": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": f"{name}.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "apply": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "concept": ["load", 0],
                                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "tokens_only": {"class_type": "ProtoBoothApplyConcept", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "concept": ["load", 0], "strength_model": 1.0, "strength_clip": 0.0}},
        **prediction_nodes("stock", ["stock", 0], ["stock", 1], f"a photo of embedding:{name} square on a table"),
        **prediction_nodes("applied", ["apply", 0], ["apply", 1], "a photo of zqsquare square on a table"),
        **prediction_nodes("in_graph", ["train", 0], ["train", 1], "a photo of zqsquare square on a table"),
        **prediction_nodes("class_only", ["tokens_only", 0], ["tokens_only", 1], "a photo of zqsquare square on a table"),
        **prediction_nodes("plain", ["ckpt", 0], ["ckpt", 1], "a photo of square square on a table"),
        **prediction_nodes("plain_lora", ["stock", 0], ["stock", 1], "a photo of a square on a table"),
        **prediction_nodes("plain_base", ["ckpt", 0], ["ckpt", 1], "a photo of a square on a table"),
    })
    # Save first, Load after: ComfyUI runs output nodes in order and Load Concept reads the file Save wrote.
    comfyui.run({key: value for key, value in graph.items() if key in ("ckpt", "photo", "masks", "train", "save")}, timeout=600)
    log_start = len(comfyui.log_text())
    entry = comfyui.run(graph, timeout=600)
    assert lora_keys_not_loaded(comfyui.log_text()[log_start:]) == []
    with safe_open(str(comfyui.models("loras") / f"{name}.safetensors"), "pt") as handle:
        assert all(key.startswith("lora_te_text_model_encoder_layers_") for key in handle.keys())  # the UNet is untouched
    stock, applied, in_graph, class_only, plain = (
        prediction(entry, p) for p in ("stock", "applied", "in_graph", "class_only", "plain"))
    assert np.abs(stock - applied).max() <= 1e-5
    assert np.abs(in_graph - applied).max() <= 1e-5
    assert np.abs(class_only - plain).max() <= 1e-5  # strength_clip 0: no LoRA, class word vectors: the base model
    assert np.abs(plain - applied).max() > 1e-3
    # The text encoder's LoRA reaches prompts without the trigger word too (the CLIP itself is patched).
    assert np.abs(prediction(entry, "plain_lora") - prediction(entry, "plain_base")).max() > 1e-4


# One build: an attribute concept is a plain UNet LoRA, the path the object-driven tests run on both builds.
@long_run_on_one_build
def test_an_attribute_concept_at_strength_lambda_is_stock_load_lora_at_lambda(comfyui, comfyui_checkpoint, photo):
    name = "protobooth_test_attribute"
    train = {"class_type": "ProtoBoothTrainAttribute", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["photo", 0], "masks": ["masks", 0],
        "tokens": "zqsquare", "class_words": "square", "steps": 3, "hyper_learning_rate": 1e-2, "token_learning_rate": 5e-3,
        "attribute": "appearance", "layers": "auto", "resolution": 64, "seed": 7}}
    base = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "masks": {"class_type": "ProtoBoothTestBoxMasks", "inputs": {"image": ["photo", 0], "boxes": json.dumps([RED_SQUARE])}},
        "train": train,
        "save": {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name, "overwrite": True}},
    }
    comfyui.run(base, timeout=600)
    graph = dict(base, load={"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}})
    text = "a photo of zqsquare square on a table"
    for strength in (0.5, 1.0):
        tag = str(strength).replace(".", "_")
        graph.update({
            f"stock{tag}": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                            "lora_name": f"{name}.safetensors", "strength_model": strength, "strength_clip": 1.0}},
            f"apply{tag}": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                            "concept": ["load", 0], "strength_model": strength, "strength_clip": 1.0}},
            **prediction_nodes(f"stock{tag}", [f"stock{tag}", 0], [f"stock{tag}", 1], f"a photo of embedding:{name} square on a table"),
            **prediction_nodes(f"apply{tag}", [f"apply{tag}", 0], [f"apply{tag}", 1], text),
        })
    graph.update(prediction_nodes("in_graph", ["train", 0], ["train", 1], text))
    log_start = len(comfyui.log_text())
    entry = comfyui.run(graph, timeout=600)
    assert lora_keys_not_loaded(comfyui.log_text()[log_start:]) == []
    for tag in ("0_5", "1_0"):
        assert np.abs(prediction(entry, f"stock{tag}") - prediction(entry, f"apply{tag}")).max() <= 1e-5, tag
    assert np.abs(prediction(entry, "in_graph") - prediction(entry, "apply1_0")).max() <= 1e-5
    assert np.abs(prediction(entry, "apply0_5") - prediction(entry, "apply1_0")).max() > 1e-4  # λ does scale it


def test_a_concept_trained_by_the_engine_reproduces_in_comfyui_through_stock_loaders(comfyui, comfyui_checkpoint):
    from protobooth.engine.concept.concept import save_concept
    from protobooth.engine.models.loading import load_model
    from protobooth.engine.train import OneShotTrainer, TrainSettings

    name = "protobooth_engine_square"
    model = load_model(comfyui.models("checkpoints") / comfyui_checkpoint)
    mask = torch.zeros(64, 64)
    mask[8:28, 8:28] = 1
    settings = TrainSettings.from_values(steps=2, lora_rank=4, lora_learning_rate=1e-3, token_learning_rate=5e-3, prior_weight=0,
                             resolution=64, seed=3)
    with OneShotTrainer(model, two_shapes_photo(), [mask], ["zqsquare"], ["square"], settings) as trainer:
        trainer.train()
        save_concept(trainer.concept(), comfyui.models("loras") / f"{name}.safetensors",
                     comfyui.models("embeddings") / f"{name}.safetensors")
        with trainer.trained_pipeline() as pipeline:
            ids = pipeline.tokenizer(["a photo of zqsquare square"], padding="max_length", max_length=77,
                                     return_tensors="pt").input_ids
            states = pipeline.text_encoder(input_ids=ids)[0]
            expected = pipeline.unet(LATENT, 500, encoder_hidden_states=states).sample.flatten().numpy()
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_checkpoint}},
        "stock": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": f"{name}.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        **prediction_nodes("stock", ["stock", 0], ["stock", 1], f"a photo of embedding:{name} square"),
    }
    log_start = len(comfyui.log_text())
    entry = comfyui.run(graph, timeout=600)
    assert lora_keys_not_loaded(comfyui.log_text()[log_start:]) == []
    context = np.array(entry["outputs"]["stock_predict"]["context"][0])
    assert context.shape == (77 * 768,)  # every position, the trigger word's included
    assert np.abs(context - states.flatten().numpy()).max() <= 1e-4
    assert np.abs(prediction(entry, "stock") - expected).max() <= 1e-4


def test_training_shows_live_previews_on_the_node(comfyui, comfyui_checkpoint, photo):
    """Every preview_every steps (and at the end) the server sends the node a picture: loss curve beside a sample."""
    graph = training_graph(comfyui_checkpoint, photo, steps=4, preview_every=2)
    entry, pictures = comfyui.run_watched(graph)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    previews = [p for p in pictures if p.size == (768, 256)]  # the loss curve (512) beside the sample (256)
    assert len(previews) == 2, [p.size for p in pictures]
    curve_area = np.asarray(previews[-1].convert("L"))[:, :512]
    assert (curve_area < 128).mean() > 0.005  # axes, text and the curve are drawn


def test_cancel_stops_training_writes_nothing_and_leaves_the_inputs(comfyui, comfyui_checkpoint, photo):
    name = "protobooth_cancelled"
    before = weights_digest(comfyui, comfyui_checkpoint)
    graph = training_graph(comfyui_checkpoint, photo, tokens="zqcancel", steps=100000, seed=11)
    graph["save"] = {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name, "overwrite": True}}
    started = comfyui.log_text().count("Train Concept: training zqcancel")
    prompt_id = comfyui.queue(graph)
    deadline = time.monotonic() + 300
    while comfyui.log_text().count("Train Concept: training zqcancel") == started:
        assert time.monotonic() < deadline, comfyui.log_tail()
        time.sleep(0.2)
    time.sleep(2)  # a few steps in
    comfyui.interrupt()
    entry = comfyui.wait(prompt_id, timeout=120)
    assert "interrupted in ProtoBoothTrainConcept" in execution_error(entry)
    assert not any((comfyui.models(folder) / f"{name}.safetensors").exists() for folder in ("loras", "embeddings"))
    after = weights_digest(comfyui, comfyui_checkpoint)
    assert after["model_patches"] == 0 and after["tokenizer"] == "SD1Tokenizer"
    assert after == before


def test_an_upstream_lora_gets_its_own_class_images_and_cancel_stops_drawing_them(comfyui, comfyui_checkpoint,
                                                                                   comfy_tiny, photo):
    from protobooth.engine.fileio import save_safetensors
    from protobooth.engine.train.class_prior import cache_dir, cache_entry
    from protobooth.engine.train import TrainSettings

    # A cache entry for the plain checkpoint's class images, standing in for an earlier run's.
    seed, settings = 23, TrainSettings().method
    entry, _ = cache_entry(comfy_tiny.fingerprint, settings.class_prompt.format("square"), settings.prior_images, 64, seed,
                           settings.prior_steps, settings.prior_guidance)
    save_safetensors({"latents": torch.zeros(settings.prior_images, 4, 8, 8)}, entry)

    # The plain checkpoint reads it: the entry is where the node looks.
    start = len(comfyui.log_text())
    comfyui.run(training_graph(comfyui_checkpoint, photo, tokens="zqprior", steps=1, prior_weight=1.0, seed=seed), timeout=600)
    assert "drawing 4 class image(s)" not in comfyui.log_text()[start:]

    # Another class prompt (the node's optional input) is another set of class images (drawn again on each build).
    red, _ = cache_entry(comfy_tiny.fingerprint, "a photo of a red square", settings.prior_images, 64, seed,
                         settings.prior_steps, settings.prior_guidance)
    red.unlink(missing_ok=True)
    start = len(comfyui.log_text())
    comfyui.run(training_graph(comfyui_checkpoint, photo, tokens="zqprior", steps=1, prior_weight=1.0, seed=seed,
                               class_prompt="a photo of a red {}"), timeout=600)
    assert "drawing 4 class image(s) for 'a photo of a red square'" in comfyui.log_text()[start:]
    assert red.is_file()  # the node's run drew exactly the entry computed here
    cached = sorted(path for path in cache_dir().rglob("*") if path.is_file())

    # Through a LoRA the same checkpoint draws other pictures: the node draws its own, and Cancel stops that.
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for module_name, module in comfy_tiny.unet.named_modules():
        if module_name.endswith(("attn1.to_q", "attn2.to_k")):
            key = "lora_unet_" + module_name.replace(".", "_")
            lora[f"{key}.lora_down.weight"] = torch.randn(4, module.weight.shape[1], generator=generator) * 0.1
            lora[f"{key}.lora_up.weight"] = torch.randn(module.weight.shape[0], 4, generator=generator) * 0.1
            lora[f"{key}.alpha"] = torch.tensor(4.0)
    save_safetensors(lora, comfyui.models("loras") / "protobooth_upstream.safetensors")
    graph = training_graph(comfyui_checkpoint, photo, tokens="zqprior", steps=100000, prior_weight=1.0, seed=seed)
    graph["lora"] = {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "strength_model": 1.0,
                                                            "strength_clip": 1.0, "lora_name": "protobooth_upstream.safetensors"}}
    graph["train"]["inputs"].update(model=["lora", 0], clip=["lora", 1])
    start = len(comfyui.log_text())
    prompt_id = comfyui.queue(graph)
    try:
        deadline = time.monotonic() + 300
        while "drawing 4 class image(s) for 'a photo of a square'" not in comfyui.log_text()[start:]:
            assert time.monotonic() < deadline, "the node did not draw class images for the LoRA'd model\n" + comfyui.log_tail()
            time.sleep(0.2)
    finally:
        comfyui.interrupt()
    result = comfyui.wait(prompt_id, timeout=300)
    assert "interrupted in ProtoBoothTrainConcept" in execution_error(result)
    assert "Train Concept: zqprior: 100000 steps" not in comfyui.log_text()[start:]
    assert sorted(path for path in cache_dir().rglob("*") if path.is_file()) == cached  # nothing (half-)written
    assert lora_keys_not_loaded(comfyui.log_text()[start:]) == []


def test_each_object_of_a_saved_concept_has_its_own_stock_embedding(comfyui, comfyui_checkpoint):
    from protobooth.engine.concept.concept import Concept, ConceptObject, save_concept

    source, name = "protobooth_pair_source", "protobooth_pair"
    generator = torch.Generator().manual_seed(31)
    objects = [ConceptObject("zqleft", "square", torch.randn(2, 768, generator=generator) * 0.05),
               ConceptObject("zqright", "box", torch.randn(1, 768, generator=generator) * 0.05)]
    save_concept(Concept(objects, {}, "sd1", "0" * 16), comfyui.models("loras") / f"{source}.safetensors",
                 comfyui.models("embeddings") / f"{source}.safetensors")
    comfyui.run({"load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": source}},
                 "save": {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["load", 0], "name": name,
                                                                             "overwrite": False}}})
    for token in ("zqleft", "zqright"):
        assert (comfyui.models("embeddings") / f"{name}_{token}.safetensors").is_file()
    assert not (comfyui.models("loras") / f"{name}.safetensors").exists()  # the concept has no LoRA
    assert name in comfyui.object_info("ProtoBoothLoadConcept")["ProtoBoothLoadConcept"]["input"]["required"]["concept_name"][0]
    assert f"{name}_zqleft" not in comfyui.object_info("ProtoBoothLoadConcept")["ProtoBoothLoadConcept"]["input"]["required"]["concept_name"][0]

    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_checkpoint}},
        "load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
        "apply": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "concept": ["load", 0],
                                                                     "strength_model": 1.0, "strength_clip": 1.0}},
    }
    for token, class_word in (("zqleft", "square"), ("zqright", "box")):
        graph.update(prediction_nodes(f"applied_{token}", ["apply", 0], ["apply", 1], f"a photo of {token} {class_word} on a table"))
        graph.update(prediction_nodes(f"stock_{token}", ["ckpt", 0], ["ckpt", 1],
                                      f"a photo of embedding:{name}_{token} {class_word} on a table"))
    graph.update(prediction_nodes("whole", ["ckpt", 0], ["ckpt", 1], f"a photo of embedding:{name} square on a table"))
    entry = comfyui.run(graph, timeout=600)
    for token in ("zqleft", "zqright"):
        applied, stock = (np.array(entry["outputs"][f"{kind}_{token}_predict"]["context"][0]) for kind in ("applied", "stock"))
        assert np.abs(applied - stock).max() <= 1e-5, token
        assert np.abs(prediction(entry, f"applied_{token}") - prediction(entry, f"stock_{token}")).max() <= 1e-5, token
    # the whole concept's file is one word spanning both objects' rows: not what either object alone gives
    assert np.abs(prediction(entry, "whole") - prediction(entry, "applied_zqleft")).max() > 1e-3


@pytest.mark.parametrize("change, message", [
    ({"boxes": [[0, 0, 0, 0]]}, "empty"),
    ({"boxes": [RED_SQUARE, BLUE_RECTANGLE]}, "2 mask(s) but 1 token(s)"),
    ({"boxes": [RED_SQUARE, BLUE_RECTANGLE], "tokens": "zqa, zqa", "class_words": "square, box"}, "zqa"),
    ({"tokens": "dog"}, "dog"),
    ({"class_words": ""}, "class word"),
])
def test_bad_training_input_is_named_and_nothing_runs(comfyui, comfyui_checkpoint, photo, change, message):
    change = dict(change)
    boxes = change.pop("boxes", [RED_SQUARE])
    graph = training_graph(comfyui_checkpoint, photo, boxes=boxes, **change)
    error = failure(comfyui, graph)
    assert "Train Concept:" in error and message in error, error


def test_mask_of_another_size_than_the_image_is_refused(comfyui, comfyui_checkpoint, photo):
    graph = training_graph(comfyui_checkpoint, photo)
    graph["masks"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    error = failure(comfyui, graph)
    assert "Train Concept:" in error and "32" in error and "64" in error, error


@pytest.mark.parametrize("name, message", [("../escape", "cannot be a file name"), ("a/b", "cannot be a file name"),
                                           (".hidden", "cannot be a file name"), ("", "cannot be a file name"),
                                           ("my mug", "contains a space"), ("n" * 300, "is 300 bytes")])
def test_concept_names_that_cannot_be_files_or_prompt_words_are_refused(comfyui, comfyui_checkpoint, photo, name, message):
    graph = training_graph(comfyui_checkpoint, photo)
    graph["save"] = {"class_type": "ProtoBoothSaveConcept", "inputs": {"concept": ["train", 2], "name": name, "overwrite": True}}
    error = failure(comfyui, graph)
    assert "Save Concept:" in error and message in error, error


@pytest.mark.parametrize("config_class, message", [
    ("Flux", "the MODEL is a Flux model; ProtoBooth works with Stable Diffusion 1.x, Stable Diffusion 2.x, SDXL"),
    ("SDXLRefiner", "the MODEL is the SDXL refiner"),
    ("SDXL_instructpix2pix", "the MODEL is an SDXL InstructPix2Pix (image edit) model"),
])
def test_a_model_the_engine_does_not_train_is_refused_by_name(comfyui, comfyui_checkpoint, photo, config_class, message):
    graph = training_graph(comfyui_checkpoint, photo)
    graph["other"] = {"class_type": "ProtoBoothTestAsFamily", "inputs": {"model": ["ckpt", 0], "config_class": config_class}}
    graph["train"]["inputs"]["model"] = ["other", 0]
    error = failure(comfyui, graph)
    assert "Train Concept:" in error and message in error, error


def test_apply_concept_checks_the_family_and_warns_about_another_base_model(comfyui, comfyui_checkpoint):
    from protobooth.engine.concept.concept import Concept, ConceptObject, save_concept

    vectors = torch.randn(1, 768, generator=torch.Generator().manual_seed(0)) * 0.01
    for name, family in (("protobooth_other_base", "sd1"), ("protobooth_sd2_concept", "sd2")):
        concept = Concept([ConceptObject("zqother", "square", vectors)], {}, family, "0" * 16)
        save_concept(concept, comfyui.models("loras") / f"{name}.safetensors", comfyui.models("embeddings") / f"{name}.safetensors")

    def graph(name):
        return {
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_checkpoint}},
            "load": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
            "apply": {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "concept": ["load", 0],
                                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            **prediction_nodes("applied", ["apply", 0], ["apply", 1], "a photo of zqother square"),
        }

    warnings = comfyui.log_text().count("was trained on another base model")
    comfyui.run(graph("protobooth_other_base"), timeout=600)
    assert comfyui.log_text().count("was trained on another base model") == warnings + 1
    error = failure(comfyui, graph("protobooth_sd2_concept"))
    assert "Apply Concept:" in error and ("trained on Stable Diffusion 2.x (sd2) but the MODEL is Stable Diffusion 1.x "
                                          "(sd1)") in error, error


def test_two_chained_apply_concepts_make_both_trigger_words_work(comfyui, comfyui_checkpoint):
    from protobooth.engine.concept.concept import Concept, ConceptObject, save_concept

    names = {"zqfirst": "protobooth_chain_first", "zqsecond": "protobooth_chain_second"}
    for seed, (token, name) in enumerate(names.items()):
        vectors = torch.randn(1, 768, generator=torch.Generator().manual_seed(seed + 20)) * 0.05
        concept = Concept([ConceptObject(token, "square", vectors)], {}, "sd1", "0" * 16)
        save_concept(concept, comfyui.models("loras") / f"{name}.safetensors", comfyui.models("embeddings") / f"{name}.safetensors")

    def apply(node, model, clip, name):
        return {f"load_{node}": {"class_type": "ProtoBoothLoadConcept", "inputs": {"concept_name": name}},
                node: {"class_type": "ProtoBoothApplyConcept", "inputs": {"model": model, "clip": clip, "concept": [f"load_{node}", 0],
                                                                          "strength_model": 1.0, "strength_clip": 1.0}}}

    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfyui_checkpoint}},
        **apply("first", ["ckpt", 0], ["ckpt", 1], names["zqfirst"]),
        **apply("second", ["first", 0], ["first", 1], names["zqsecond"]),
        **prediction_nodes("chained", ["second", 0], ["second", 1], "a photo of zqfirst square and zqsecond square"),
        **prediction_nodes("stock", ["ckpt", 0], ["ckpt", 1],
                           f"a photo of embedding:{names['zqfirst']} square and embedding:{names['zqsecond']} square"),
        **prediction_nodes("only_first", ["first", 0], ["first", 1], "a photo of zqfirst square and zqsecond square"),
    }
    entry = comfyui.run(graph, timeout=600)
    # the UNet's prediction reads every position of the text context
    chained, stock, only_first = (prediction(entry, p) for p in ("chained", "stock", "only_first"))
    assert np.abs(chained - stock).max() <= 1e-5  # both words read their own vectors
    assert np.abs(chained - only_first).max() > 1e-3  # the second concept did something


@pytest.mark.comfyui
def test_inside_comfyui_class_images_are_cached_in_its_user_directory(comfy_tiny):
    from comfyui_harness import CURRENT, ComfyUIServer
    from kit.checkpoints import write_single_file

    if CURRENT.unavailable():
        pytest.skip(CURRENT.unavailable())
    with ComfyUIServer(CURRENT, unset=("PROTOBOOTH_CACHE",)) as comfyui:  # as a user runs it: no cache variable
        write_single_file(comfy_tiny, comfyui.models("checkpoints") / "tiny.safetensors")
        Image.fromarray(two_shapes_photo()).save(comfyui.input_dir / PHOTO)
        comfyui.run(training_graph("tiny.safetensors", PHOTO, steps=1, prior_weight=1.0), timeout=600)
        cached = list((comfyui.base / "user" / "protobooth" / "class-latents").rglob("*.safetensors"))
        assert len(cached) == 1, comfyui.log_tail()
