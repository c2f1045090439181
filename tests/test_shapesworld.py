"""ShapesWorld: the generator, the shipped model and metric models, and the benchmark scripts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from protobooth.benchmarks.shapesworld import metrics
from protobooth.engine.shapesworld import world

ROOT = Path(__file__).resolve().parents[1]


def test_scenes_are_deterministic_from_their_seed():
    first, second = world.SceneSampler(5).scenes(40), world.SceneSampler(5).scenes(40)
    assert first == second and first != world.SceneSampler(6).scenes(40)
    images_a, masks_a = world.render(first)
    images_b, masks_b = world.render(second)
    assert torch.equal(images_a, images_b) and torch.equal(masks_a, masks_b)
    assert images_a.shape == (40, 3, 32, 32) and masks_a.shape == (40, 2, 32, 32)


def test_masks_cover_exactly_the_objects():
    instance = world.Instance("square", "red")
    scene = world.Scene("gray", (world.Placed(instance, "left"),))
    image, masks = world.render([scene])
    red = torch.tensor(world.COLOURS["red"])[:, None]
    inside = masks[0, 0] == 1
    assert inside.sum() > 100 and masks[0, 1].sum() == 0
    assert torch.allclose(image[0][:, inside], red.expand(3, int(inside.sum())), atol=1e-6)
    outside = masks[0, 0] == 0
    assert torch.allclose(image[0][:, outside], torch.tensor(world.BACKGROUNDS["gray"])[:, None], atol=1e-6)
    assert inside[:, :16].sum() == inside.sum()  # on the left


def test_captions_say_what_text_can_and_not_the_accent():
    accented = world.Instance("circle", "red", "band-across", "white")
    plain = world.Instance("square", "blue")
    scene = world.Scene("pink", (world.Placed(plain, "right"), world.Placed(accented, "left")))
    assert scene.caption() == "a photo of a red circle on the left and a blue square on the right, pink background"
    assert scene.caption({1: "zqobj circle"}) == "a photo of a zqobj circle on the left and a blue square on the right, pink background"


def test_captions_tokenise_into_whole_words():
    from protobooth.engine.text.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    words = {*world.CLASSES, *world.COLOURS, *world.BACKGROUNDS, *world.POSITIONS, "photo", "background", "and", "on", "the"}
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_held_out_instances_never_appear_in_pretraining_scenes():
    held_out = {i.key for i in world.HELD_OUT}
    seen = {p.instance.key for scene in world.SceneSampler(1).scenes(20000) for p in scene.objects}
    assert not held_out & seen
    assert len(seen) > 1000  # nearly every other instance does appear
    assert held_out <= {i.key for i in world.all_instances(include_held_out=True)}


# ---------------------------------------------------------------------------------------------- shipped models

def test_the_shipped_model_loads_as_an_sd1_diffusers_folder_within_its_size_budget():
    from protobooth.engine.models.loading import detect_family
    from protobooth.engine.shapesworld import MODEL_DIR, clip_towers, load_shapesworld

    size = sum(p.stat().st_size for folder in (MODEL_DIR, metrics.METRIC_DIR) for p in folder.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"
    assert detect_family(MODEL_DIR) == "sd1"
    model = load_shapesworld()
    assert model.family == "sd1" and model.unet.dtype == torch.float32 and model.vae_scale_factor == 4
    assert model.unet.config.sample_size * model.vae_scale_factor == world.IMAGE_SIZE
    towers = clip_towers(model.text_encoder)
    assert towers.visual_projection.out_features == model.text_encoder.config.hidden_size


def test_the_classifier_reads_real_renders():
    classifier = metrics.load_classifier()
    scenes = world.SceneSampler(123, world.all_instances(include_held_out=True)).scenes(300)
    images, _ = world.render(scenes)
    accuracy = metrics.scene_accuracy(classifier, images, scenes)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_fidelity_separates_an_instance_from_its_look_alikes():
    separation = metrics.validate(metrics.load_encoder(), list(world.HELD_OUT[:3]), scenes_per_instance=4)
    assert separation.same_instance > 0.8, separation
    assert separation.same_instance - separation.same_class_other_instance > 0.3, separation


def test_the_benchmarks_reference_photos_are_seeded_and_vary_what_their_kind_says():
    from protobooth.benchmarks.shapesworld import evaluate as ev

    for index, instance in enumerate(world.HELD_OUT):
        scenes = {kind: ev.reference_scene(instance, index, kind) for kind in ev.PHOTO_KINDS}
        assert scenes == {kind: ev.reference_scene(instance, index, kind) for kind in ev.PHOTO_KINDS}  # seeded
        assert scenes["left, gray"] == ev.reference_photo([instance])[2]  # the classic photo, kept
        assert (scenes["right, gray"].background, scenes["right, gray"].objects[0].position) == ("gray", "right")
        assert scenes["other background"].background != "gray"
        moved = scenes["moved and resized"].objects[0]
        assert abs(moved.scale - 1) > 0.1 and moved.instance == instance  # beyond the pretraining jitter (±0.06)
    placements = {(p.dx, p.dy, p.scale) for n, i in enumerate(world.HELD_OUT)
                  for p in ev.reference_scene(i, n, "moved and resized").objects}
    assert len(placements) == len(world.HELD_OUT)  # each instance moved its own way


def test_class_preservation_and_the_three_way_mean():
    from protobooth.benchmarks.shapesworld import evaluate as ev

    base = ev.Scores(fidelity=[0.1, 0.1], editability=[1.0, 1.0], class_likeness=[0.1, 0.3], scenes=["a", "b"])
    trained = ev.Scores(fidelity=[0.8, 0.4], editability=[1.0, 0.5], class_likeness=[0.5, 0.5], scenes=["a", "b"])
    row = trained.row(base)
    assert row["class preservation"] == pytest.approx(1 - (0.5 - 0.2))
    assert row["harmonic mean (3)"] == pytest.approx(3 / (1 / 0.6 + 1 / 0.75 + 1 / 0.7))
    assert row["per scene"] == {"a": 0.8, "b": 0.4}
    assert base.row(base)["class preservation"] == 1.0 and trained.row()["harmonic mean (3)"] is None
    merged = ev.Scores.merged([base, trained])
    assert merged.fidelity == [0.1, 0.1, 0.8, 0.4] and merged.scenes == ["a", "b", "a", "b"]


def test_the_encoder_rows_use_the_encoder_file_evaluate_is_given(tmp_path, capsys):
    """--encoder: the encoder rows read another encoder file (one being tuned); a file that is none is refused first."""
    from protobooth.benchmarks.shapesworld import evaluate as ev
    from protobooth.engine.encoder.model import ObjectEncoder, load_encoder, save_encoder
    from protobooth.engine.shapesworld import clip_towers, load_shapesworld
    from protobooth.engine.text.vocabulary import class_word_vectors

    shipped = load_encoder(ev.ENCODER_FILE)[0]
    save_encoder(ObjectEncoder(shipped.shape), tmp_path / "untrained.safetensors")
    model = load_shapesworld()
    instance = world.HELD_OUT[0]
    image, masks, _ = ev.reference_photo([instance])
    start = lambda *file: ev.initial_vectors(model, clip_towers(), ev.Method("e", init="encoder"), image, masks,  # noqa: E731
                                             [ev.TOKEN], [instance.shape], *file)[0]
    class_word = class_word_vectors(model.text_encoder, model.tokenizer, instance.shape, shipped.shape.queries)
    assert torch.equal(start(tmp_path / "untrained.safetensors"), class_word)  # an untrained encoder: the class word
    assert not torch.allclose(start(), class_word)  # the shipped one, by default
    (tmp_path / "not.safetensors").write_text("not an encoder")
    with pytest.raises(SystemExit):
        ev.main(["--encoder", str(tmp_path / "not.safetensors"), "--quick"])
    assert "--encoder:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the scripts

@pytest.mark.slow
def test_the_training_pipeline_runs_every_stage_in_smoke_mode(tmp_path):
    script = ROOT / "benchmarks" / "shapesworld" / "train_world.py"
    done = subprocess.run([sys.executable, str(script), "all", "--smoke", "--work", str(tmp_path)], capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "export" / "shapesworld" / "model_index.json").is_file()
    assert (tmp_path / "export" / "metric" / "encoder.safetensors").is_file()


def test_the_gate_reads_an_exported_folder_such_as_the_shipped_model(tmp_path):
    from protobooth.engine.shapesworld import MODEL_DIR

    shutil.copy(metrics.METRIC_DIR / "classifier.safetensors", tmp_path / "classifier.safetensors")
    script = ROOT / "benchmarks" / "shapesworld" / "train_world.py"
    done = subprocess.run([sys.executable, str(script), "gate", "--model", str(MODEL_DIR), "--work", str(tmp_path),
                           "--gate-samples", "16", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gate" in json.loads((tmp_path / "log.json").read_text())
    assert ": met" in done.stdout, done.stdout[-2000:]


def quick_run(script: str, results: Path, *extra: str) -> None:
    """A ShapesWorld benchmark's --quick run into `results`; it must succeed."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapesworld" / script), "--quick", *extra,
                           "--results", str(results)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_evaluate_quick_writes_its_table_and_grids(tmp_path):
    quick_run("evaluate.py", tmp_path)
    table = (tmp_path / "quick.md").read_text()
    for method in ("ground truth", "base model (class words)", "textual inversion", "DreamBooth-LoRA", "object-driven (ours)",
                   "ours, no prototype init", "ours, no class regularisation", "ours, no object mask", "object-driven, two objects",
                   "object encoder (no training)", "ours, encoder start", "ours, recomposition",
                   "ours, recomposition, object-only prototype", "ours, object-only prototype",
                   "ours, recomposition, class-word start", "ours, recomposition, object-only prototype, attention loss",
                   "ours, recomposition, object-only prototype, class prompt names the colour",
                   "TextBoost", "TextBoost, no augmentation",
                   "TextBoost, no knowledge preservation", "TextBoost, uniform timesteps"):
        assert f"| {method} |" in table
    assert ("| class likeness | class preservation | harmonic mean | harmonic mean (3) | class attributes | train s | "
            "trainable params | file KB |") in table
    assert "| method | left, gray | moved and resized |" in table  # per kind of reference photo
    assert "| method | black, right | pink, left | brown, right |" in table  # per new scene
    assert "- instance 4 (green-circle-cap-left-purple): left, gray: left, gray; moved and resized: " in table
    assert "| base model (class words) |" in table and "two objects, attention loss" in table
    rows = json.loads((tmp_path / "quick.json").read_text())["rows"]
    assert rows["base model (class words)"]["overall"]["class preservation"] == 1.0
    assert "ours, encoder start, 25 steps" not in table  # the head-start rows need more than a quick run's 60 steps
    assert len(list(tmp_path.glob("quick_grid_*.png"))) == 23


@pytest.mark.slow
def test_evaluate_gives_the_same_tables_from_two_worker_processes(tmp_path):
    quick_run("evaluate.py", tmp_path / "one", "--workers", "1")
    quick_run("evaluate.py", tmp_path / "two", "--workers", "2")
    one, two = (json.loads((tmp_path / name / "quick.json").read_text())["rows"] for name in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:  # one thread per worker against two in one process: float noise, no more
        for field in ("fidelity", "editability", "class likeness"):
            assert one[name]["overall"][field] == pytest.approx(two[name]["overall"][field], abs=0.02), (name, field)


@pytest.mark.slow
def test_the_attribute_benchmark_quick_writes_its_table_curve_and_check(tmp_path):
    quick_run("attributes.py", tmp_path, "--rows", "2", "--steps", "20")
    table = (tmp_path / "attributes_quick.md").read_text()
    for row in ("ground truth", "base model (plain target)", "attribute (OSTAF, decoder)", "attribute, encoder",
                "λ curve", "| 1.25 |", "Metric check on ground-truth renders of the targets"):
        assert row in table
    assert "| ground truth | 1.000 |" in table  # the answers score themselves perfectly
    assert (tmp_path / "attributes_quick_lambda_sweep.png").is_file()


@pytest.mark.slow
def test_the_steps_benchmark_quick_scores_one_run_at_each_count(tmp_path):
    quick_run("steps.py", tmp_path)
    table = (tmp_path / "steps_quick.md").read_text()
    assert "| object-driven (ours) | 5" in table and "| object-driven (ours) | 10" in table
    assert "◄ enough" in table and "| 1 × 25 |" in table
    counts = json.loads((tmp_path / "steps_quick.json").read_text())["curve"]["object-driven (ours)"]
    assert sorted(counts) == ["10", "5"] and all(len(c["fidelity"]) == 2 for c in counts.values())
    assert (tmp_path / "steps_quick.png").is_file()


def test_the_demo_learns_a_shapesworld_instance_by_default(tmp_path):
    from protobooth.engine.cli import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "--quiet"]) == 0
    for name in ("reference.png", "reference-mask-1.png", "loras/demo.safetensors", "embeddings/demo.safetensors",
                 "demo-loss.png", "demo-preview.png"):
        assert (tmp_path / name).is_file(), name
    from PIL import Image

    assert Image.open(tmp_path / "reference.png").size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    # beside the tuned previews, the shipped object encoder's zero-shot concept draws the same prompts and seeds
    from protobooth.engine.demo import shapesworld_demo, zero_shot_previews
    from protobooth.engine.learn import preview_grid

    job = shapesworld_demo()
    # its class images are drawn for the words of the last preview row, which shows how far they drifted
    class_words = job.settings.method.class_prompt.format(job.class_words[0]).removeprefix("a photo of a ")
    assert class_words == "red circle" and f"a {class_words} " in job.preview_prompts[-1]
    zero_shot = np.asarray(preview_grid(zero_shot_previews(job)[0], job.preview_prompts, job.preview_seeds))
    tuned = np.asarray(Image.open(tmp_path / "demo-preview.png").convert("RGB"))
    compare = np.asarray(Image.open(tmp_path / "demo-compare.png"))
    title = compare.shape[0] - tuned.shape[0]
    assert np.array_equal(compare[title:, : zero_shot.shape[1]], zero_shot)
    assert np.array_equal(compare[title:, -tuned.shape[1] :], tuned)
    assert not np.array_equal(zero_shot, tuned)
