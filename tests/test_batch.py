"""`protobooth batch` on tiny models: the manifest checked whole, in-process runs, skip-if-done and resume, and Ray."""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from kit.interrupts import ctrl_c_in_a_finaliser_after
from protobooth.engine.cli import main
from protobooth.engine.concept.concept import load_concept, read_concept_metadata
from protobooth.engine.models import tiny

FAST = {"steps": 4, "prior_images": 1, "prior_steps": 2}
requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason="Ray is optional (pip install 'protobooth[ray]'); requirements-dev.txt has it")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three photos with masks and a tiny SD1 model as a diffusers folder."""
    root = tmp_path_factory.mktemp("batch")
    for index, colour in enumerate([(230, 60, 30), (30, 200, 60), (40, 60, 220)]):
        picture = np.full((64, 64, 3), 110, dtype=np.uint8)
        picture[16:48, 12 + 4 * index : 40 + 4 * index] = colour
        Image.fromarray(picture).save(root / f"photo{index}.png")
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[16:48, 12 + 4 * index : 40 + 4 * index] = 255
        Image.fromarray(mask).save(root / f"mask{index}.png")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(root / "small-mask.png")
    tiny.tiny_model(0).pipeline().save_pretrained(root / "model")
    return root


def write_manifest(path, lines: list) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def concept_line(index: int, **extra) -> dict:
    return {"image": f"photo{index}.png", "token": f"zqobj{index}", "class": "box", "mask": f"mask{index}.png", **extra}


def batch(photos, manifest: str, out, *extra) -> int:
    return main(["batch", manifest, "--model", str(photos / "model"), "--out", str(out), "--sampler-steps", "2",
                 "--quiet", *extra])


def test_every_bad_line_is_named_before_anything_runs(photos, tmp_path, capsys):
    manifest = write_manifest(photos / "bad.jsonl", [
        {"defaults": {"settings": FAST}},
        concept_line(0),
        {"image": "missing.png", "token": "zqa", "class": "box", "mask": "mask0.png"},  # 3: no photo
        concept_line(1, mask="small-mask.png", token="zqb"),  # 4: mask of another size
        concept_line(2, name="zqobj0"),  # 5: a name line 2 has
        concept_line(1, token="zqobj0", name="other"),  # 6: line 2's token, another photo
        concept_line(2, token="zqc", method="no-such-method"),  # 7
        concept_line(2, token="zqd", settings={"stepz": 3}),  # 8: unknown setting
        "{not json",  # 9
        {"image": "photo2.png", "token": "zqe", "class": "box", "box": [1, 1, 20, 20]},  # 10: a box needs --sam
    ])
    out = tmp_path / "models"
    assert batch(photos, manifest, out) == 2
    error = capsys.readouterr().err
    for line, words in [(3, "image file not found"), (4, "32x32 but the image is 64x64"), (5, "also line 2's"),
                        (6, "another photo on line 2"), (7, "no-such-method"), (8, "stepz"), (9, "not JSON"),
                        (10, "--sam")]:
        assert f"line {line}: " in error and words in error, (line, words, error)
    assert "line 2:" not in error  # the good line is not blamed
    assert not out.exists()  # nothing ran, nothing was written


@pytest.fixture(scope="module")
def two_trained(photos, tmp_path_factory):
    """Two concepts learned in-process on one torch thread (as each Ray task gets): (manifest, models folder, output)."""
    import contextlib
    import io

    manifest = write_manifest(photos / "two.jsonl", [{"defaults": {"settings": FAST}}, concept_line(0),
                                                      concept_line(1, name="second")])
    out = tmp_path_factory.mktemp("two") / "models"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert batch(photos, manifest, out, "--threads", "1") == 0
    return manifest, out, printed.getvalue()


def test_a_batch_trains_in_process_then_skips_what_is_done(photos, two_trained, tmp_path, capsys):
    import shutil

    manifest, trained, table = two_trained
    out = tmp_path / "models"
    shutil.copytree(trained, out)  # the module's folder stays as trained, for the Ray test
    for name in ("zqobj0", "second"):
        assert (out / "loras" / f"{name}.safetensors").is_file() and (out / "embeddings" / f"{name}.safetensors").is_file()
        assert (out / "protobooth-batch" / f"{name}-preview.png").is_file()
        assert f"| {name} | object-driven | trained |" in table
    assert (out / "protobooth-batch" / "contact-sheet.png").is_file()
    assert re.search(r"Class images found in the cache for [12] of the 2 trained concepts", table)  # one class
    assert not list((out / "protobooth-batch" / "checkpoints").iterdir())  # finished concepts keep no checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["embeddings", "loras", "protobooth-batch"]  # a models folder
    first_hash = read_concept_metadata(out / "embeddings" / "zqobj0.safetensors")["inputs_hash"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    assert batch(photos, manifest, out) == 0  # the same inputs again: nothing to do
    assert "| zqobj0 | object-driven | skipped |" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps

    (out / "embeddings" / "second.safetensors").unlink()  # as a worker killed between the LoRA and the embedding
    assert batch(photos, manifest, out) == 0  # a half-saved concept of the same inputs is not in the way
    assert "| second | object-driven | trained |" in capsys.readouterr().out
    load_concept(out / "embeddings/second.safetensors", out / "loras/second.safetensors")

    changed = write_manifest(photos / "changed.jsonl", [{"defaults": {"settings": {**FAST, "seed": 7}}}, concept_line(0)])
    assert batch(photos, changed, out) == 2  # other inputs under a taken name: refused without --overwrite
    assert "line 2 (zqobj0)" in capsys.readouterr().err
    assert batch(photos, changed, out, "--overwrite") == 0
    assert read_concept_metadata(out / "embeddings" / "zqobj0.safetensors")["inputs_hash"] != first_hash


def test_a_concept_cut_off_resumes_from_its_checkpoint_to_the_same_result(photos, tmp_path, monkeypatch, capsys):
    from protobooth.engine.train import OneShotTrainer

    settings = {**FAST, "steps": 6, "checkpoint_every": 2}
    manifest = write_manifest(photos / "one.jsonl", [concept_line(0, settings=settings)])
    whole = tmp_path / "whole"
    assert batch(photos, manifest, whole) == 0

    train = OneShotTrainer.train

    def cut_off_after_step_3(self, progress=None, **kwargs):
        def report(step):
            if step.step == 3:
                raise KeyboardInterrupt
            progress(step)
        return train(self, progress=report, **kwargs)

    out = tmp_path / "cut"
    monkeypatch.setattr(OneShotTrainer, "train", cut_off_after_step_3)
    assert batch(photos, manifest, out) == 130
    assert not list(out.rglob("*.safetensors"))  # no concept file, whole or partial
    assert list(out.rglob("checkpoint.pt"))
    monkeypatch.setattr(OneShotTrainer, "train", train)
    capsys.readouterr()
    assert batch(photos, manifest, out) == 0
    assert "| zqobj0 | object-driven | resumed |" in capsys.readouterr().out
    resumed = load_concept(out / "embeddings/zqobj0.safetensors", out / "loras/zqobj0.safetensors")
    uncut = load_concept(whole / "embeddings/zqobj0.safetensors", whole / "loras/zqobj0.safetensors")
    assert torch.equal(resumed.objects[0].vectors, uncut.objects[0].vectors)
    assert all(torch.equal(resumed.lora[k], uncut.lora[k]) for k in uncut.lora)


def test_ctrl_c_lost_in_a_finaliser_still_stops_the_batch_at_the_next_step(photos, tmp_path, monkeypatch, capsys):
    from protobooth.engine.train import OneShotTrainer

    steps_run = ctrl_c_in_a_finaliser_after(OneShotTrainer, 2, monkeypatch)
    manifest = write_manifest(photos / "lost.jsonl", [concept_line(0, settings={**FAST, "steps": 40})])
    assert batch(photos, manifest, tmp_path / "out") == 130
    assert len(steps_run) == 2, "the step after the lost interrupt should not run"
    assert "KeyboardInterrupt" not in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_a_ray_address_that_does_not_answer_is_an_error_not_a_hang(photos, tmp_path, capsys):
    manifest = write_manifest(photos / "ray-one.jsonl", [concept_line(0, settings=FAST)])
    assert batch(photos, manifest, tmp_path / "models", "--ray", "127.0.0.1:9") == 2
    assert "nothing answers there" in capsys.readouterr().err


def test_a_box_is_segmented_with_sam_before_training(photos, tmp_path, capsys):
    from kit.sam import save_sam_checkpoint, tiny_sam

    save_sam_checkpoint(tiny_sam(0), tmp_path / "sam_tiny.pth")
    line = {"image": "photo0.png", "token": "zqboxed", "class": "box", "box": [12, 16, 40, 48], "settings": FAST}
    manifest = write_manifest(photos / "boxed.jsonl", [line])
    out = tmp_path / "models"
    assert batch(photos, manifest, out, "--sam", str(tmp_path / "sam_tiny.pth")) == 0
    assert "| zqboxed | object-driven | trained |" in capsys.readouterr().out
    load_concept(out / "embeddings/zqboxed.safetensors", out / "loras/zqboxed.safetensors")


@requires_ray
def test_a_batch_runs_on_local_ray_with_the_same_concepts_as_in_process(photos, two_trained, tmp_path, capsys):
    manifest, here, _ = two_trained
    there = tmp_path / "models"
    assert batch(photos, manifest, there, "--ray", "auto", "--threads", "1") == 0
    assert capsys.readouterr().out.count("| trained |") == 2
    for name in ("zqobj0", "second"):
        a = load_concept(here / f"embeddings/{name}.safetensors", here / f"loras/{name}.safetensors")
        b = load_concept(there / f"embeddings/{name}.safetensors", there / f"loras/{name}.safetensors")
        # One torch thread on both sides: the same sums, the same bits, wherever it ran.
        assert torch.equal(a.objects[0].vectors, b.objects[0].vectors)
        assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)


@requires_ray
@pytest.mark.slow
def test_a_worker_killed_mid_concept_costs_only_the_steps_since_its_checkpoint(photos, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    settings = {**FAST, "steps": 60, "checkpoint_every": 10}
    manifest = write_manifest(photos / "kill.jsonl", [concept_line(0, settings=settings), concept_line(1, settings=settings)])
    out = tmp_path / "models"
    command = [sys.executable, "-c", "from protobooth.engine.cli import main; raise SystemExit(main())", "batch", manifest,
               "--model", str(photos / "model"), "--out", str(out), "--sampler-steps", "2", "--ray", "auto", "--threads", "1"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        if len(list(out.glob("protobooth-batch/checkpoints/*/checkpoint.pt"))) == 2:  # both past their first checkpoint
            workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::protobooth-concept" in " ".join(p.info["cmdline"] or [])]
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = run.communicate(timeout=600)
    assert killed is not None, "no running concept task was found to kill"
    assert run.returncode == 0, stderr[-3000:]
    assert "| resumed |" in stdout, stdout  # Ray retried the task; it went on from the checkpoint
    for name in ("zqobj0", "zqobj1"):
        load_concept(out / f"embeddings/{name}.safetensors", out / f"loras/{name}.safetensors")  # both whole
    assert sorted(p.name for p in (out / "loras").iterdir()) == ["zqobj0.safetensors", "zqobj1.safetensors"]
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["zqobj0.safetensors", "zqobj1.safetensors"]
