"""The zero fine-tuning object encoder: its concept, its file, its pretraining (deterministic, resumable, the same
on one process as on two), the encode command and the head start it gives training."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT
from kit.encoder_job import tiny_settings, tiny_setup
from protobooth.engine.cli import main
from protobooth.engine.concept.concept import concept_applied, load_concept, save_concept
from protobooth.engine.encoder.encode import encode_concept, object_vectors
from protobooth.engine.encoder.model import EncoderShape, ObjectEncoder, crop_features, load_encoder, save_encoder
from protobooth.engine.encoder.pretrain import pretrain
from protobooth.engine.encoder.sources import ShapesWorldPairs
from protobooth.engine.errors import InputError
from protobooth.engine.models import tiny
from protobooth.engine.shapesworld import world
from protobooth.engine.text.vocabulary import class_word_vectors, vocabulary_norm


def two_objects():
    """A ShapesWorld photo of two held-out instances and their masks."""
    scene = world.Scene("gray", (world.Placed(world.HELD_OUT[0], "left"), world.Placed(world.HELD_OUT[1], "right")))
    images, masks = world.render([scene])
    return images[0], [(masks[0, i] > 0.5).float() for i in range(2)]


def test_an_untrained_encoder_gives_the_class_word_and_its_concept_is_a_stock_embedding(tmp_path):
    model, towers = tiny_setup()
    encoder = ObjectEncoder(EncoderShape(vision_width=32, text_width=tiny.TEXT_WIDTH, queries=4, width=32, layers=1))
    image, masks = two_objects()
    concept = encode_concept(encoder, {}, crop_features(towers), model, image, masks, ["zqband", "zqcorner"],
                             ["circle", "square"])
    for obj in concept.objects:  # the output layer starts at zero: pretraining moves each object away from its class
        assert torch.equal(obj.vectors, class_word_vectors(model.text_encoder, model.tokenizer, obj.class_word, 4))
    save_concept(concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    loaded = load_concept(tmp_path / "emb.safetensors")
    assert loaded.settings["method"]["name"] == "encoder" and loaded.tokens == ["zqband", "zqcorner"]
    pipeline = model.pipeline()
    with concept_applied(pipeline, loaded):  # diffusers' own load_textual_inversion reads it
        ids = pipeline.tokenizer.convert_tokens_to_ids(["zqband", "zqband_1", "zqband_2", "zqband_3"])
        table = pipeline.text_encoder.get_input_embeddings().weight
        assert torch.equal(table[ids].detach(), concept.objects[0].vectors)


def test_pretraining_is_deterministic_and_resumes_where_it_stopped(tmp_path):
    model, towers = tiny_setup()
    settings = tiny_settings(steps=4, checkpoint_every=2)
    whole = pretrain(model, towers, ShapesWorldPairs(), settings, tmp_path / "whole.safetensors", work=tmp_path / "w1")

    def stop_at_three(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    model, towers = tiny_setup()
    with pytest.raises(KeyboardInterrupt):
        pretrain(model, towers, ShapesWorldPairs(), settings, tmp_path / "cut.safetensors", work=tmp_path / "w2",
                 progress=stop_at_three)
    assert not (tmp_path / "cut.safetensors").exists()
    model, towers = tiny_setup()
    resumed = pretrain(model, towers, ShapesWorldPairs(), settings, tmp_path / "cut.safetensors", work=tmp_path / "w2",
                       resume=True)
    assert resumed == whole and all(np.isfinite(whole))
    first, second = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "cut.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_the_background_weight_reweights_pictures_of_an_object_and_leaves_general_pictures_alone(tmp_path):
    def losses(**changes):
        model, towers = tiny_setup()
        settings = tiny_settings(steps=2, identity_weight=0.0, drop_probability=0.0, **changes)
        return pretrain(model, towers, ShapesWorldPairs(), settings, tmp_path / "e.safetensors")

    general = dict(general_share=1.0)  # no object in the pictures: an all-ones mask, the plain loss whatever the weight
    assert np.allclose(losses(background_weight=0.25, **general), losses(**general), rtol=0, atol=1e-6)
    pairs = dict(general_share=0.0)
    assert not np.allclose(losses(background_weight=0.25, **pairs), losses(**pairs), rtol=1e-3, atol=0)


def test_two_processes_give_the_loss_curve_of_one_process_with_twice_the_batch(tmp_path):
    """Data-parallel pretraining (gloo, two CPU processes) against one process: started by torch.distributed.run and
    by `accelerate launch --multi_gpu` (which starts them the same way and, with no GPU, accelerate runs them on CPU)."""
    job = str(ROOT / "tests" / "kit" / "encoder_job.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    port = lambda run: str(29500 + (os.getpid() + run) % 1000)  # noqa: E731
    runs = {"one": [sys.executable, job, "4"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port(0),
                         job, "2"],
            "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", port(1), job, "2"]}
    for name, command in runs.items():
        done = subprocess.run([*command, str(tmp_path / f"{name}.safetensors")], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, (name, done.stderr[-3000:])
    one = json.loads((tmp_path / "one.safetensors.json").read_text())
    first = load_file(tmp_path / "one.safetensors")
    for two in ("torchrun", "accelerate"):
        curve = json.loads((tmp_path / f"{two}.safetensors.json").read_text())
        assert np.allclose(one, curve, rtol=0, atol=1e-5), (two, one, curve)
        second = load_file(tmp_path / f"{two}.safetensors")
        # (Adam divides by the gradients' own size, so the weights keep a little more of the summation order's rounding)
        assert max(float((first[n] - second[n]).abs().max()) for n in first) < 1e-4, two


def test_a_pretrained_encoder_tells_objects_apart_and_ships_its_unet_lora(tmp_path):
    model, towers = tiny_setup()
    unet_before = {name: p.clone() for name, p in model.unet.state_dict().items()}
    pretrain(model, towers, ShapesWorldPairs(), tiny_settings(steps=3, unet_lora_rank=2), tmp_path / "e.safetensors")
    # the LoRA ships in the encoder's file; the caller's UNet comes back as it was
    assert model.unet.state_dict().keys() == unet_before.keys() and not getattr(model.unet, "peft_config", None)
    assert all(torch.equal(p, unet_before[name]) for name, p in model.unet.state_dict().items())
    encoder, lora, notes = load_encoder(tmp_path / "e.safetensors")
    assert notes["settings"]["unet_lora_rank"] == 2 and lora and all(k.startswith("lora_unet_") for k in lora)
    model, towers = tiny_setup()
    image, masks = two_objects()
    first, second = object_vectors(encoder, crop_features(towers), model.text_encoder, model.tokenizer, image, masks,
                                   ["circle", "circle"])  # the same class word: only the pictures differ
    assert (first - second).abs().max() > 1e-6
    class_word = class_word_vectors(model.text_encoder, model.tokenizer, "circle", encoder.shape.queries)
    bound = max(vocabulary_norm(model.text_encoder), float(class_word.norm(dim=1).max()))
    assert encoder.shape.max_norm == vocabulary_norm(model.text_encoder)
    assert float(torch.cat([first, second]).norm(dim=1).max()) <= bound * (1 + 1e-5)  # as long as a word, no longer
    concept = encode_concept(encoder, lora, crop_features(towers), model, image, masks[:1], ["zqband"], ["circle"])
    assert concept.lora.keys() == lora.keys()
    pipeline = model.pipeline()
    with concept_applied(pipeline, concept):  # diffusers' load_lora_weights takes the shipped LoRA
        assert "protobooth" in pipeline.get_list_adapters().get("unet", [])


def test_files_that_are_not_encoders_and_encoders_for_other_models_are_refused(tmp_path):
    from protobooth.engine.encoder.encode import check_encoder_fits

    (tmp_path / "not.safetensors").write_bytes(b"nonsense")
    with pytest.raises(InputError, match="could not be read as a safetensors file"):
        load_encoder(tmp_path / "not.safetensors")
    save_concept(load_concept_stub(), tmp_path / "l.safetensors", tmp_path / "emb.safetensors")
    with pytest.raises(InputError, match="is not a ProtoBooth object encoder"):
        load_encoder(tmp_path / "emb.safetensors")
    encoder = ObjectEncoder(EncoderShape(vision_width=32, text_width=tiny.TEXT_WIDTH, family="sd2", width=32, layers=1))
    save_encoder(encoder, tmp_path / "sd2.safetensors")
    loaded, _, _ = load_encoder(tmp_path / "sd2.safetensors")
    with pytest.raises(InputError, match="pretrained for SD2"):
        check_encoder_fits(loaded, "sd1", tiny.TEXT_WIDTH, 32, "the encoder")
    fitting = ObjectEncoder(EncoderShape(vision_width=64, text_width=tiny.TEXT_WIDTH, width=32, layers=1))
    with pytest.raises(InputError, match="reads 64-wide CLIP vision features"):
        check_encoder_fits(fitting, "sd1", tiny.TEXT_WIDTH, 32, "the encoder")


def load_concept_stub():
    from protobooth.engine.concept.concept import Concept, ConceptObject

    return Concept([ConceptObject("zqx", "cat", torch.zeros(1, tiny.TEXT_WIDTH))], {}, "sd1", "0" * 16)


def test_encode_command_and_the_encoder_head_start_of_training(tmp_path):
    model, towers = tiny_setup()
    model.pipeline().save_pretrained(tmp_path / "model")
    tiny.tiny_clip(model.text_encoder).save_pretrained(tmp_path / "clip")
    pretrain(model, towers, ShapesWorldPairs(), tiny_settings(steps=2), tmp_path / "e.safetensors")
    image, masks = two_objects()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray((masks[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    common = ["--model", str(tmp_path / "model"), "--clip", str(tmp_path / "clip"), "--token", "zqband", "--class",
              "circle", "--mask", str(tmp_path / "mask.png"), "--quiet"]
    assert main(["encode", str(tmp_path / "photo.png"), "--encoder", str(tmp_path / "e.safetensors"), *common,
                 "--out", str(tmp_path / "encoded")]) == 0
    encoded = load_concept(tmp_path / "encoded/embeddings/zqband.safetensors").objects[0].vectors
    # The head start: training from the encoder's vectors, with the token's learning rate 0, keeps them.
    assert main(["train", str(tmp_path / "photo.png"), "--encoder", str(tmp_path / "e.safetensors"), *common,
                 "--steps", "1", "--token-lr", "0", "--prior-weight", "0", "--vectors", "4", "--out",
                 str(tmp_path / "trained"), "--preview-prompt", "zqband"]) == 0
    trained = load_concept(tmp_path / "trained/embeddings/zqband.safetensors",
                           tmp_path / "trained/loras/zqband.safetensors").objects[0].vectors
    assert torch.equal(trained, encoded)
    queries = load_encoder(tmp_path / "e.safetensors")[0].shape.queries
    assert not torch.equal(encoded, class_word_vectors(model.text_encoder, model.tokenizer, "circle", queries))


def test_shapesworld_ships_its_encoder_and_encode_uses_it_by_default(tmp_path):
    from protobooth.engine.shapesworld.model import OBJECT_ENCODER_FILE, load_shapesworld

    image, masks = two_objects()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "photo.png")
    Image.fromarray((masks[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert main(["encode", str(tmp_path / "photo.png"), "--token", "zqband", "--class", "circle", "--mask",
                 str(tmp_path / "mask.png"), "--out", str(tmp_path), "--quiet"]) == 0
    concept = load_concept(tmp_path / "embeddings/zqband.safetensors")
    model = load_shapesworld()
    assert concept.family == "sd1" and concept.base_fingerprint == model.fingerprint
    queries = load_encoder(OBJECT_ENCODER_FILE)[0].shape.queries
    start = class_word_vectors(model.text_encoder, model.tokenizer, "circle", queries)
    assert concept.objects[0].vectors.shape == start.shape and not torch.allclose(concept.objects[0].vectors, start)


def test_the_encoder_oracle_is_given_the_attributes_of_the_instance_each_pretraining_pair_shows():
    """benchmarks/shapesworld/encoder_oracle.py draws each pair's instance again to know its attributes; read them back
    from the reference picture's pixels, so a change in how the pairs are drawn cannot go unnoticed."""
    from protobooth.benchmarks.shapesworld import encoder_oracle as oracle

    palette = torch.tensor(list(world.COLOURS.values()))
    nearest = lambda rgb: int((palette - rgb).norm(dim=1).argmin())  # noqa: E731
    source, accented = oracle.OracleSource(), 0
    for seed in range(24):
        sample = source.sample(seed, general=False)
        colour, accent, second = sample.rows
        inside = sample.reference[:, sample.reference_mask > 0.99].T  # [pixels, 3], edges left out
        assert nearest(inside.median(0).values) == colour
        other = inside[(inside - palette[colour]).norm(dim=1) > 0.3]
        assert (accent == 0) == (len(other) == 0)
        if accent:
            assert second == nearest(other.median(0).values)
            accented += 1
    assert accented >= 12  # three quarters of the instances have an accent
    assert source.sample(0, general=True).rows == (0, 0, 0)


def identity_folders(root, general: bool = True):
    """Two identities (a red disc, a blue bar) in two photos each, on other backgrounds and places, 80x64 pixels."""
    from PIL import ImageDraw

    for identity, (colour, shape, class_word) in {"disc": ((220, 30, 30), "ellipse", "ball"),
                                                  "bar": ((30, 30, 220), "rectangle", "box")}.items():
        folder = root / "objects" / identity
        folder.mkdir(parents=True)
        (folder / "class.txt").write_text(class_word + "\n")
        for index, (background, left) in enumerate([((200, 200, 200), 8), ((40, 120, 40), 40)]):
            photo, mask = Image.new("RGB", (80, 64), background), Image.new("L", (80, 64), 0)
            box = (left, 16, left + 28, 44)
            getattr(ImageDraw.Draw(photo), shape)(box, fill=colour)
            getattr(ImageDraw.Draw(mask), shape)(box, fill=255)
            photo.save(folder / f"p{index}.png")
            mask.save(folder / f"p{index}.mask.png")
        (folder / "p1.txt").write_text(f"a photo of {{token}} {class_word} on the grass")
    if general:
        (root / "general").mkdir()
        Image.new("RGB", (64, 64), (90, 90, 200)).save(root / "general" / "sky.png")
        (root / "general" / "sky.txt").write_text("a blue sky")


def test_identity_folders_give_pairs_of_one_object_and_pretrain_any_model(tmp_path):
    from protobooth.engine.encoder.sources import IdentityFolders

    identity_folders(tmp_path / "data")
    source = IdentityFolders(tmp_path / "data", need_general=True, size=32)
    for seed in range(6):
        sample = source.sample(seed, general=False)
        assert sample.class_word in ("ball", "box") and sample.target.shape == sample.reference.shape == (3, 32, 32)
        # the same object in both pictures, on two different backgrounds, its mask over it
        for picture, mask in ((sample.reference, sample.reference_mask), (sample.target, sample.target_mask)):
            inside = picture[:, mask > 0.5].mean(1)
            assert (inside[0] > 0.6) == (sample.class_word == "ball") and (inside[2] > 0.6) == (sample.class_word == "box")
        assert not torch.allclose(sample.reference[:, 0, 0], sample.target[:, 0, 0])
        assert "{token} " + sample.class_word in sample.caption
    assert source.sample(0, general=True).caption == "a blue sky"

    model, _ = tiny_setup()
    model.pipeline().save_pretrained(tmp_path / "model")
    tiny.tiny_clip(model.text_encoder).save_pretrained(tmp_path / "clip")
    assert main(["pretrain-encoder", "--model", str(tmp_path / "model"), "--clip", str(tmp_path / "clip"), "--data",
                 str(tmp_path / "data"), "--steps", "2", "--batch-size", "2", "--width", "32", "--layers", "1",
                 "--identity-below", "1000", "--out", str(tmp_path / "e.safetensors"), "--quiet"]) == 0
    encoder, _, notes = load_encoder(tmp_path / "e.safetensors")
    assert encoder.shape.text_width == tiny.TEXT_WIDTH and notes["settings"]["steps"] == 2
    assert np.isfinite(notes["final_loss"])


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "objects/bar/p1.mask.png").unlink(), r"p1.png has no mask p1.mask.png"),
    (lambda d: [(d / "objects/bar" / n).unlink() for n in ("p1.png", "p1.mask.png")], r"bar has 1 photo\(s\); an identity needs two"),
    (lambda d: (d / "objects/bar/p1.txt").write_text("a box on the grass"), r"p1.txt must name the object as \{token\}"),
    (lambda d: (d / "objects/bar/class.txt").write_text("cardboard box"), r"class.txt must hold the object's class word"),
    (lambda d: (d / "general/sky.txt").write_text("{token} in the sky"), r"sky.txt is a general picture's caption"),
    (lambda d: __import__("shutil").rmtree(d / "general"), r"no general/ pictures .* or pass --general-share 0"),
    (lambda d: __import__("shutil").rmtree(d / "objects"), r"has no objects/ folder"),
])
def test_pretraining_data_is_checked_whole_before_the_model_loads(tmp_path, capsys, change, message):
    identity_folders(tmp_path / "data")
    change(tmp_path / "data")
    # a model path that does not exist: the data's error comes first
    assert main(["pretrain-encoder", "--model", str(tmp_path / "no-model"), "--clip", str(tmp_path / "no-clip"),
                 "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert re.search(message, capsys.readouterr().err)
