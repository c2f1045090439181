"""The command line end to end on tiny models: segment → train → generate, the demo, and bad input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from protobooth.engine.models import tiny
from protobooth.engine.cli import main
from protobooth.engine.concept.concept import load_concept
from kit.interrupts import CtrlCInAFinaliser
from kit.sam import save_sam_checkpoint, tiny_sam


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A photo, a tiny SAM checkpoint and a tiny SD1 model saved as a diffusers folder."""
    root = tmp_path_factory.mktemp("cli")
    picture = np.full((64, 64, 3), 110, dtype=np.uint8)
    picture[16:48, 12:40] = (230, 60, 30)
    Image.fromarray(picture).save(root / "photo.png")
    save_sam_checkpoint(tiny_sam(0), root / "sam_tiny.pth")
    tiny.tiny_model(0).pipeline().save_pretrained(root / "model")
    return root


def test_segment_train_generate(files, capsys):
    masks = files / "masks"
    assert main(["segment", str(files / "photo.png"), "--sam", str(files / "sam_tiny.pth"),
                 "--object", "box=12,16,40,48", "--out", str(masks)]) == 0
    assert (masks / "mask_1.png").is_file() and (masks / "preview.png").is_file()
    # The random-weight SAM's mask is meaningless as a shape, but it is what `segment` wrote: train reads it.
    segmented = np.asarray(Image.open(masks / "mask_1.png")) > 127
    assert 0 < segmented.mean() < 1

    out = files / "out"
    argv = ["train", str(files / "photo.png"), "--model", str(files / "model"), "--token", "zqcat", "--class", "cat",
            "--mask", str(masks / "mask_1.png"), "--steps", "4", "--prior-images", "1", "--out", str(out),
            "--preview-prompt", "a photo of zqcat cat", "--quiet"]
    assert main(argv) == 0
    for name in ("loras/zqcat.safetensors", "embeddings/zqcat.safetensors", "zqcat-loss.png", "zqcat-preview.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["zqcat.safetensors"]  # one object, one file
    concept = load_concept(out / "embeddings/zqcat.safetensors", out / "loras/zqcat.safetensors")
    assert concept.tokens == ["zqcat"] and concept.lora

    assert main(argv) == 2  # the concept exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err

    images = files / "images"
    assert main(["generate", "a photo of zqcat cat", "a photo of a cat", "--model", str(files / "model"),
                 "--concept", str(out / "embeddings/zqcat.safetensors"), "--seed", "1", "--seed", "2",
                 "--steps", "3", "--out", str(images), "--quiet"]) == 0
    pictures = sorted(images.glob("0*.png"))
    assert len(pictures) == 4 and (images / "grid.png").is_file()
    first, second = (np.asarray(Image.open(p)) for p in pictures[:2])
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)  # two seeds, two pictures


def test_ctrl_c_lost_in_a_finaliser_stops_generating_at_the_next_picture(files, tmp_path, monkeypatch, capsys):
    import protobooth.engine.generate as generating

    reports, original = [], generating.generate

    def generate_then_ctrl_c(*args, progress, **kwargs):
        def report(done, total):
            reports.append(done)
            if done == 1:
                CtrlCInAFinaliser()
            progress(done, total)
        return original(*args, progress=report, **kwargs)

    monkeypatch.setattr(generating, "generate", generate_then_ctrl_c)
    out = tmp_path / "images"
    assert main(["generate", "a photo of a cat", "--model", str(files / "model"), "--seed", "1", "--seed", "2",
                 "--seed", "3", "--steps", "2", "--out", str(out), "--quiet"]) == 130
    assert reports[-1] == 1, "no picture after the lost interrupt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == "protobooth generate: cancelled; nothing written."
    assert not list(tmp_path.rglob("*.png"))


def test_train_and_generate_on_an_sdxl_single_file(files, tmp_path):
    """An SDXL checkpoint in the original layout trains from the command line; its concept holds each token vector's
    CLIP-L and bigG halves, and generate draws with it."""
    from safetensors.torch import load_file

    from kit.checkpoints import write_single_file

    model = tmp_path / "sdxl.safetensors"
    write_single_file(tiny.tiny_model(0, family="sdxl"), model)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 12:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert main(["train", str(files / "photo.png"), "--model", str(model), "--token", "zqcat", "--class", "cat",
                 "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--prior-weight", "0", "--out", str(out),
                 "--preview-prompt", "a photo of zqcat cat", "--quiet"]) == 0
    embedding = out / "embeddings/zqcat.safetensors"
    concept = load_concept(embedding, out / "loras/zqcat.safetensors")
    assert concept.family == "sdxl" and concept.lora
    rows = concept.objects[0].vectors.shape[0]
    stored = {key: tuple(tensor.shape) for key, tensor in load_file(embedding).items()}
    assert stored == {"clip_l": (rows, tiny.TEXT_WIDTH), "clip_g": (rows, tiny.BIG_G_WIDTH)}

    images = tmp_path / "images"
    assert main(["generate", "a photo of zqcat cat", "--model", str(model), "--concept", str(embedding), "--steps", "2",
                 "--out", str(images), "--quiet"]) == 0
    assert np.asarray(Image.open(images / "000-seed0.png")).shape == (64, 64, 3)


def test_sdxl_prototype_searches_both_halves_with_clip_and_clip_g(files, tmp_path):
    """--clip (CLIP ViT-L/14) searches each token's CLIP-L half, --clip-g (OpenCLIP ViT-bigG/14) its bigG half."""
    from kit.checkpoints import write_single_file
    from protobooth.engine.images import check_masks, load_image
    from protobooth.engine.models.loading import load_model
    from protobooth.engine.prototype import ClipTowers, PrototypeSettings, prototype_embeddings
    from protobooth.engine.text.vocabulary import class_word_vectors
    from transformers import CLIPModel

    sdxl = tiny.tiny_model(0, family="sdxl")
    write_single_file(sdxl, tmp_path / "sdxl.safetensors")
    for name, encoder in (("clip", sdxl.text_encoder.clip_l), ("clip_g", sdxl.text_encoder.clip_g)):
        tiny.tiny_clip(encoder).save_pretrained(tmp_path / name)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 12:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = tmp_path / "out"
    assert main(["train", str(files / "photo.png"), "--model", str(tmp_path / "sdxl.safetensors"), "--clip",
                 str(tmp_path / "clip"), "--clip-g", str(tmp_path / "clip_g"), "--token", "zqcat", "--class", "cat",
                 "--mask", str(tmp_path / "m.png"), "--steps", "1", "--token-lr", "0", "--prototype-steps", "5",
                 "--prior-weight", "0", "--out", str(out), "--preview-prompt", "zqcat", "--quiet"]) == 0
    saved = load_concept(out / "embeddings/zqcat.safetensors", out / "loras/zqcat.safetensors").objects[0].vectors

    model = load_model(tmp_path / "sdxl.safetensors")
    towers = [ClipTowers.from_clip_model(CLIPModel.from_pretrained(tmp_path / name, local_files_only=True).eval())
              for name in ("clip", "clip_g")]
    image = load_image(files / "photo.png")
    [found] = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, check_masks([tmp_path / "m.png"], image),
                                   ["zqcat"], ["cat"], PrototypeSettings(steps=5))
    assert torch.equal(saved, found.vectors)
    start = class_word_vectors(model.text_encoder, model.tokenizer, "cat", 1)
    for half in (slice(0, tiny.TEXT_WIDTH), slice(tiny.TEXT_WIDTH, None)):  # both halves were searched
        assert not torch.allclose(saved[:, half], start[:, half], atol=1e-3)


def test_clip_g_on_a_model_without_big_g_is_refused_before_loading(files, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")  # a folder that passes the first look; the model is SD1
    code = main(["train", str(files / "photo.png"), "--model", str(files / "model"), "--clip-g", str(tmp_path),
                 "--token", "zqcat", "--class", "cat", "--mask", str(files / "photo.png"), "--out", str(files / "no"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--clip-g is for SDXL's second text encoder" in err and "leave --clip-g out" in err, err


def test_demo_writes_everything(tmp_path):
    assert main(["demo", "--model", "tiny", "--out", str(tmp_path), "--steps", "3", "--quiet"]) == 0
    for name in ("reference.png", "reference-mask-1.png", "loras/demo.safetensors", "embeddings/demo.safetensors",
                 "demo-loss.png", "demo-preview.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("command", ["segment", "train", "generate", "demo"])
def test_help_explains_every_option(command):
    result = subprocess.run([sys.executable, "-m", "protobooth.engine.cli", command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("options:", 1)[1].splitlines()
    options = 0
    for index, line in enumerate(lines):
        if line.startswith("  -"):
            options += 1
            explained_here = "  " in line.strip()
            explained_below = index + 1 < len(lines) and lines[index + 1].startswith(" " * 8)
            assert explained_here or explained_below, f"{command}: option without explanation: {line.strip()}"
    assert options >= 3


def test_bad_model_path_is_a_clean_error(files, capsys):
    mask = files / "mask_full.png"
    Image.fromarray(np.full((64, 64), 255, dtype=np.uint8)).save(mask)
    code = main(["train", str(files / "photo.png"), "--model", str(files / "no-such-model"), "--token", "zqcat",
                 "--class", "cat", "--mask", str(mask), "--out", str(files / "bad"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "protobooth train: error:" in err and "Traceback" not in err
    assert not (files / "bad").exists()


def test_token_init_vectors_reach_the_saved_concept(files):
    from protobooth.engine.images import check_masks, load_image
    from protobooth.engine.models.loading import load_model
    from protobooth.engine.prototype import ClipTowers, PrototypeSettings, prototype_embeddings
    from protobooth.engine.text.vocabulary import class_word_vectors
    from transformers import CLIPModel

    out = files / "out-clip"
    clip = tiny.tiny_clip(tiny.tiny_text_encoder(2))  # the text tower of tiny_model(0)'s text encoder (seed 0+2)
    clip.save_pretrained(files / "clip")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 12:40] = 255
    Image.fromarray(mask).save(files / "m.png")
    # Token learning rate 0: the saved vectors are exactly where the prototype search left them.
    assert main(["train", str(files / "photo.png"), "--model", str(files / "model"), "--clip", str(files / "clip"),
                 "--token", "zqcat", "--class", "cat", "--mask", str(files / "m.png"), "--steps", "2", "--token-lr", "0",
                 "--prototype-steps", "5", "--prior-images", "1", "--out", str(out), "--quiet"]) == 0
    saved = load_concept(out / "embeddings/zqcat.safetensors", out / "loras/zqcat.safetensors").objects[0].vectors

    model = load_model(files / "model")
    towers = ClipTowers.from_clip_model(CLIPModel.from_pretrained(files / "clip", local_files_only=True).eval())
    image = load_image(files / "photo.png")
    [found] = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image,
                                   check_masks([files / "m.png"], image), ["zqcat"], ["cat"], PrototypeSettings(steps=5))
    assert torch.equal(saved, found.vectors)
    assert not torch.allclose(saved, class_word_vectors(model.text_encoder, model.tokenizer, "cat", 1), atol=1e-3)


def test_two_objects_also_get_one_embedding_file_each(files):
    from safetensors.torch import load_file

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 12:40] = 255
    Image.fromarray(mask).save(files / "first.png")
    Image.fromarray(255 - mask).save(files / "second.png")
    out = files / "out-two"
    assert main(["train", str(files / "photo.png"), "--model", str(files / "model"), "--token", "zqcat", "--class", "cat",
                 "--mask", str(files / "first.png"), "--token", "zqmat", "--class", "mat", "--mask", str(files / "second.png"),
                 "--steps", "2", "--lambda-class", "0", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["zqcat.safetensors", "zqcat_zqcat.safetensors",
                                                                      "zqcat_zqmat.safetensors"]
    concept = load_concept(out / "embeddings/zqcat.safetensors", out / "loras/zqcat.safetensors")
    for obj in concept.objects:
        assert torch.equal(load_file(str(out / f"embeddings/zqcat_{obj.token}.safetensors"))["clip_l"], obj.vectors)


@pytest.mark.parametrize("option, message", [
    (["--vectors", "0"], "vectors per token must be at least 1 (got 0)"),
    (["--prior-images", "0"], "prior images must be at least 1 while the class prior is on (got 0)"),
    (["--resolution", "-64"], "resolution must be at least 8 or unset (got -64)"),
    (["--alpha", "0"], "LoRA alpha must be above 0"),
    (["--checkpoint-every", "-2"], "checkpoint every must be at least 0 (got -2)"),
    (["--clip", "no-such-clip", "--prototype-steps", "0"], "prototype steps must be a whole number of at least 1"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "fp16 mixed precision needs a CUDA GPU (the model is on cpu)"),
])
def test_impossible_settings_are_a_one_line_error(files, capsys, option, message):
    out = files / "refused"
    code = main(["train", str(files / "photo.png"), "--model", str(files / "model"), "--token", "zqcat", "--class", "cat",
                 "--mask", str(files / "photo.png"), "--out", str(out), "--quiet", *option])
    assert code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and err.startswith("protobooth train: error: "), err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_bf16_training_loads_the_model_in_bf16_and_keeps_the_trainables_in_fp32(files, monkeypatch):
    """--mixed-precision bf16 stores the frozen weights in bf16 (no fp32 model, no autocast copies); what
    trains, and so the saved concept, stays fp32."""
    from protobooth.engine.models import loading
    from protobooth.engine.train import trainer as trainer_module

    seen = {}
    real_load, real_step = loading.load_model, trainer_module.OneShotTrainer._train_step

    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        seen["weights"] = {p.dtype for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters()}
        return model

    def step(self):
        seen["autocast"] = self.autocast
        seen["trainables"] = {p.dtype for group in self.optimizer.param_groups for p in group["params"]}
        return real_step(self)

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(trainer_module.OneShotTrainer, "_train_step", step)
    out, mask = files / "out-bf16", np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 12:40] = 255
    Image.fromarray(mask).save(files / "mask-bf16.png")
    assert main(["train", str(files / "photo.png"), "--model", str(files / "model"), "--token", "zqcat", "--class",
                 "cat", "--mask", str(files / "mask-bf16.png"), "--steps", "2", "--prior-images", "1", "--out", str(out),
                 "--mixed-precision", "bf16", "--preview-prompt", "a photo of zqcat cat", "--quiet"]) == 0
    assert seen == {"weights": {torch.bfloat16}, "autocast": None, "trainables": {torch.float32}}
    concept = load_concept(out / "embeddings/zqcat.safetensors", out / "loras/zqcat.safetensors")
    assert {v.dtype for v in concept.lora.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in concept.lora.values())
