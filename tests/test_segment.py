"""Segmentation: prompt parsing, SAM checkpoints (architecture from the weights), masks, preview, CLI.

A random-weight tiny SAM gives meaningless masks, so these tests check the mechanics: which mask is
chosen, how often the image is encoded, sizes, order, refinement, files and errors.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from protobooth.engine.cli import main
from protobooth.engine.errors import InputError
from protobooth.engine.images import to_pil, to_uint8_hwc
from protobooth.engine.segment.sam_import import import_segment_anything
from kit.sam import save_sam_checkpoint, tiny_sam, tiny_sam_config
from protobooth.engine.segment import ObjectPrompt, Segmenter, load_sam, overlay_masks, parse_prompts, refine_mask
from protobooth.engine.segment.sam_files import SAM_CONFIGS, sam_config_from_state_dict, sam_from_config

WIDTH, HEIGHT = 64, 48
PROMPTS = [
    {"box": [5, 5, 40, 40]},
    {"positive": [[20, 20]], "negative": [[50, 30]]},
    {"points": [[50, 10], [10, 40]], "labels": [1, 0]},
    {"box": [30, 10, 60, 45], "positive": [[45, 30]]},
]


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sam():
    return tiny_sam(0)


@pytest.fixture(scope="module")
def segmenter(sam, image):
    segmenter = Segmenter(sam)
    segmenter.set_image(image)
    return segmenter


@pytest.fixture(scope="module")
def files(tmp_path_factory, sam, image):
    """A tiny SAM checkpoint, the image as PNG, a user mask PNG."""
    folder = tmp_path_factory.mktemp("segment")
    save_sam_checkpoint(sam, folder / "tiny_sam.pth")
    to_pil(image).save(folder / "photo.png")
    drawn = torch.zeros(HEIGHT, WIDTH)
    drawn[10:30, 20:50] = 1
    to_pil(drawn).save(folder / "drawn.png")
    return folder


# ---- prompts ------------------------------------------------------------------------------------


def test_parse_prompts_reads_every_form():
    prompts = parse_prompts(
        json.dumps(
            [
                {"box": [1, 2, 30, 40]},
                {"points": [[5, 6], {"x": 7, "y": 8}], "labels": [1, 0]},
                {"positive": [[1, 1]], "negative": [[2, 2], [3, 3]], "points": [[4, 4]]},
                {"points": [[9, 9]]},
            ]
        )
    )
    assert prompts[0] == ObjectPrompt(box=(1.0, 2.0, 30.0, 40.0), points=[], labels=[])
    assert prompts[1].points == [(5.0, 6.0), (7.0, 8.0)] and prompts[1].labels == [1, 0]
    # "points" first, then "positive", then "negative"; unlabeled points are on the object
    assert prompts[2].points == [(4, 4), (1, 1), (2, 2), (3, 3)] and prompts[2].labels == [1, 1, 0, 0]
    assert prompts[3].labels == [1]
    # a single object without the list, parsed JSON, and ObjectPrompts pass too
    assert parse_prompts({"box": [1, 2, 30, 40]}) == prompts[:1]
    assert parse_prompts([ObjectPrompt(points=[(5, 6)])])[0].labels == [1]


@pytest.mark.parametrize(
    "prompts, expected",
    [
        ("", "empty"),
        ("[{", "not valid JSON"),
        ("[]", "empty"),
        ("5", "must be a list"),
        ('[{"box": [10, 10, 5, 20]}]', ["prompts[0]", "inverted"]),
        ('[{"box": [0, 0, 10, 10]}, {}]', ["prompts[1]", "object 2", "no box and no point"]),
        ('[{"boxes": [0, 0, 1, 1]}]', ["unknown key", "boxes"]),
        ('[{"box": [0, 0, "a", 4]}]', "box must be 4 finite numbers"),
        ('[{"box": [0, 0, 1]}]', "box must be 4 finite numbers"),
        ('[{"positive": [[1, 2, 3]]}]', "prompts[0].positive[0]"),
        ('[{"negative": 5}]', "prompts[0].negative must be a list"),
        ('[{"points": [[1, 2], [3, 4]], "labels": [1]}]', ["prompts[0].labels", "one label per"]),
        ('[{"points": [[1, 2]], "labels": [2]}]', "label 1 is 2"),
        ('[{"positive": [[1, 2]], "labels": [1]}]', "without"),
        ('[{"box": [0, 0, 70, 10]}]', ["object 1", "outside the 64x48 image"]),
        ('[{"box": [0, 0, 10, 10]}, {"points": [[10, -1]]}]', ["object 2", "point 1", "outside"]),
    ],
)
def test_parse_prompts_errors_name_the_entry(prompts, expected):
    with pytest.raises(InputError) as error:
        parse_prompts(prompts, image_size=(WIDTH, HEIGHT))
    for part in [expected] if isinstance(expected, str) else expected:
        assert part in str(error.value)


def test_object_prompt_check_names_the_object():
    with pytest.raises(InputError, match="the cup: 1 points but 2 labels"):
        ObjectPrompt(points=[(1, 2)], labels=[1, 0]).check("the cup")
    with pytest.raises(InputError, match="the cup: no box and no point"):
        ObjectPrompt().check("the cup")
    assert ObjectPrompt(box=(0, 0, WIDTH, HEIGHT)).check(image_size=(WIDTH, HEIGHT)).box == (0, 0, 64, 48)


# ---- checkpoints --------------------------------------------------------------------------------

VARIANTS = {
    "tiny": tiny_sam_config(),
    # patch 8, 128 px, windows that do not tile the grid, 8 decoder heads of 2, one decoder layer
    "odd": dataclasses.replace(
        tiny_sam_config(), image_size=128, patch_size=8, encoder_dim=48, encoder_depth=3, encoder_heads=4,
        encoder_mlp_dim=144, window_size=5, global_attn_blocks=(0, 2), prompt_dim=16, mask_in_chans=4,
        decoder_depth=1, decoder_mlp_dim=24, decoder_attention_downsample=1, multimask_outputs=2,
        iou_head_depth=2, iou_head_hidden_dim=20,
    ),  # fmt: skip
    # global attention everywhere, no qkv bias, a one-layer IoU head
    "global": dataclasses.replace(
        tiny_sam_config(), encoder_heads=4, window_size=0, global_attn_blocks=(0, 1), qkv_bias=False,
        iou_head_depth=1, iou_head_hidden_dim=32,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", VARIANTS)
def test_checkpoint_round_trip_detects_the_architecture(name, tmp_path, image):
    config = VARIANTS[name]
    model = tiny_sam(3, config)
    assert sam_config_from_state_dict(model.state_dict()) == config
    assert config.model_type == "custom"
    save_sam_checkpoint(model, tmp_path / "sam.pth")
    loaded = load_sam(tmp_path / "sam.pth")
    assert loaded.protobooth_config == config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a, b = Segmenter(model), Segmenter(loaded)
    a.set_image(image)
    b.set_image(image)
    for x, y in zip(a.segment(PROMPTS), b.segment(PROMPTS)):
        assert torch.equal(x, y)
    assert a.scores == b.scores


def test_safetensors_and_wrapped_checkpoints_load(tmp_path, sam):
    half = {k: v.half() for k, v in sam.state_dict().items()}
    from protobooth.engine.fileio import save_safetensors

    save_safetensors(half, tmp_path / "sam.safetensors")
    loaded = load_sam(tmp_path / "sam.safetensors")
    assert loaded.image_encoder.pos_embed.dtype == torch.float32
    torch.save({"model": sam.state_dict(), "epoch": 3}, tmp_path / "training.pth")
    assert load_sam(tmp_path / "training.pth").protobooth_config == tiny_sam_config()


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_published_sam_sizes_are_recognised(name):
    # segment-anything's own builders on the meta device: real shapes, no memory
    builders = import_segment_anything().sam_model_registry
    with torch.device("meta"):
        official = builders[name]().state_dict()
    config = sam_config_from_state_dict(official)
    assert config == SAM_CONFIGS[name] and config.model_type == name
    ours = sam_from_config(config, meta=True).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_load_sam_errors(tmp_path, sam, capsys):
    with pytest.raises(InputError, match="not found"):
        load_sam(tmp_path / "missing.pth")
    (tmp_path / "sam.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="suffix"):
        load_sam(tmp_path / "sam.onnx")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="could not be read"):
        load_sam(tmp_path / "garbage.pth")
    torch.save({"weight": torch.zeros(2), "payload": _Payload()}, tmp_path / "hostile.pth")
    with pytest.raises(InputError, match="could not be read"):
        load_sam(tmp_path / "hostile.pth")
    assert "code ran" not in capsys.readouterr().out
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not a segment-anything .*sam_vit_b_01ec64.pth"):
        load_sam(tmp_path / "other.pth")
    broken = dict(sam.state_dict())
    del broken["mask_decoder.iou_token.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(InputError, match="not a segment-anything.*do not fit"):
        load_sam(tmp_path / "broken.pth")


# ---- segmentation -------------------------------------------------------------------------------


def test_one_binary_mask_per_object_in_prompt_order(segmenter):
    masks = segmenter.segment(PROMPTS)
    assert len(masks) == len(segmenter.scores) == len(PROMPTS)
    for mask, prompt in zip(masks, PROMPTS):
        assert mask.shape == (HEIGHT, WIDTH) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(mask, segmenter.segment([prompt])[0])
    assert len({m.sum().item() for m in masks}) > 1  # the objects really got different masks


def test_image_is_encoded_once_for_all_objects(sam, image):
    calls = []
    hook = sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        segmenter = Segmenter(sam)
        progress = []
        segmenter.set_image(image, progress=lambda done, total: progress.append((done, total)))
        segmenter.segment(PROMPTS)
        segmenter.segment(PROMPTS[:2], multimask=False)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert progress == [(1, 2), (2, 2)]  # one report per encoder block


def test_multimask_keeps_the_highest_predicted_iou(sam, segmenter, image):
    predictor = import_segment_anything().SamPredictor(sam)
    predictor.set_image(to_uint8_hwc(image))
    for prompt in parse_prompts(PROMPTS):
        arguments = dict(
            point_coords=np.array(prompt.points) if prompt.points else None,
            point_labels=np.array(prompt.labels) if prompt.points else None,
            box=np.array(prompt.box) if prompt.box else None,
        )
        masks, scores, _ = predictor.predict(**arguments, multimask_output=True)
        assert len({m.sum() for m in masks}) > 1  # the candidates differ, so the choice matters
        assert torch.equal(segmenter.segment([prompt])[0], torch.from_numpy(masks[scores.argmax()]).float())
        single, _, _ = predictor.predict(**arguments, multimask_output=False)
        assert torch.equal(segmenter.segment([prompt], multimask=False)[0], torch.from_numpy(single[0]).float())


@pytest.mark.parametrize("ious, chosen", [([0.9, 0.2, 0.5], 0), ([0.2, 0.9, 0.5], 1), ([0.2, 0.5, 0.9], 2)])
def test_the_chosen_candidate_follows_the_iou_head(ious, chosen, image):
    model = tiny_sam(0)
    head = model.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():  # fixed predicted IoUs: token 0 is the single-mask output, 1..3 the candidates
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, *ious]))
    segmenter = Segmenter(model)
    segmenter.set_image(image)
    predictor = segmenter._predictor
    masks, scores, _ = predictor.predict(box=np.array(PROMPTS[0]["box"]), multimask_output=True)
    assert torch.equal(segmenter.segment(PROMPTS[:1])[0], torch.from_numpy(masks[chosen]).float())
    assert segmenter.scores == pytest.approx([ious[chosen]])


def test_segment_applies_dilation_and_feathering(segmenter):
    plain = segmenter.segment(PROMPTS[:2])
    grown = segmenter.segment(PROMPTS[:2], dilate=2, feather=1.5)
    for a, b in zip(plain, grown):
        assert torch.equal(b, refine_mask(a, 2, 1.5))


def test_segment_errors(sam, segmenter):
    with pytest.raises(RuntimeError, match="set_image"):
        Segmenter(sam).segment(PROMPTS)
    with pytest.raises(InputError, match="object 2.*outside the 64x48 image"):
        segmenter.segment([{"box": [1, 1, 5, 5]}, {"positive": [[100, 5]]}])
    with pytest.raises(InputError, match="feather"):
        segmenter.segment(PROMPTS, feather=-1)
    with pytest.raises(InputError, match="not found"):
        Segmenter(sam).set_image("/no/such/photo.png")


# ---- masks --------------------------------------------------------------------------------------


def _square(size=40, low=15, high=25):
    mask = torch.zeros(size, size)
    mask[low:high, low:high] = 1
    return mask


def test_refine_mask_grows_shrinks_and_softens(files):
    square = _square()
    assert torch.equal(refine_mask(square), square)
    grown, shrunk = refine_mask(square, dilate=2), refine_mask(square, dilate=-2)
    assert torch.equal(grown, _square(low=13, high=27)) and torch.equal(shrunk, _square(low=17, high=23))

    soft = refine_mask(square, feather=2.0)
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.all(soft[square == 1] == 1)  # the object stays whole
    assert 0.2 < soft[20, 26] < 1 and 0 < soft[20, 29] < soft[20, 26]  # the edge fades outward
    assert soft[0, 0] < 1e-3 and soft[20, 36] < 0.01  # far away stays background

    # user masks go through the same function (files and tensors alike)
    drawn = refine_mask(files / "drawn.png", dilate=1)
    assert drawn.shape == (HEIGHT, WIDTH) and drawn.sum() == 22 * 32
    for bad in (dict(dilate=1.5), dict(feather=-1.0), dict(feather=float("nan"))):
        with pytest.raises(InputError):
            refine_mask(square, **bad)


def test_overlay_tints_outlines_and_numbers_each_mask():
    image = torch.full((3, 60, 90), 0.5)
    left, right = torch.zeros(60, 90), torch.zeros(60, 90)
    left[10:50, 5:40] = 1
    right[10:50, 50:85] = 1
    preview = overlay_masks(image, [left, right, torch.zeros(60, 90)])
    assert preview.shape == (3, 60, 90)
    assert torch.allclose(preview[:, 0, 45], image[:, 0, 45], atol=1 / 255)  # outside every mask: untouched
    inner_left, inner_right = preview[:, 15, 12], preview[:, 15, 60]
    assert not torch.allclose(inner_left, image[:, 0, 0]) and not torch.allclose(inner_left, inner_right)
    # outline: the mask's border pixel has the pure mask colour, more saturated than the tint
    edge = preview[:, 30, 5]
    assert edge.max() - edge.min() > inner_left.max() - inner_left.min()
    # numbers: white text only appears near each mask's centre (tint and outline are never white)
    white = (preview > 0.95).all(dim=0)
    ys, xs = torch.nonzero(white, as_tuple=True)
    assert white[20:40, 12:33].any() and white[20:40, 57:78].any()
    assert ys.min() >= 15 and ys.max() <= 45
    with pytest.raises(InputError, match="mask 1 is 10x10 but the image is 90x60"):
        overlay_masks(image, [torch.ones(10, 10)])


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_segment_writes_masks_and_preview(files, tmp_path, capsys, segmenter):
    out = tmp_path / "out"
    code = main(
        ["segment", str(files / "photo.png"), "--sam", str(files / "tiny_sam.pth"), "--device", "cpu",
         "--object", "box=5,5,40,40", "--object", "point=20,20", "negative=50,30",
         "--mask", str(files / "drawn.png"), "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    expected = segmenter.segment(PROMPTS[:2])
    for number in (1, 2, 3):
        assert f"wrote {out / f'mask_{number}.png'}" in printed
        with Image.open(out / f"mask_{number}.png") as written:
            assert written.mode == "L" and written.size == (WIDTH, HEIGHT)
            pixels = torch.from_numpy(np.asarray(written).astype(np.float32) / 255)
        if number < 3:
            assert torch.equal(pixels, expected[number - 1])
    with Image.open(out / "preview.png") as preview:
        assert preview.mode == "RGB" and preview.size == (WIDTH, HEIGHT)
    assert f"wrote {out / 'preview.png'}" in printed
    assert "SAM custom (ViT 32 wide, 2 blocks" in printed

    # the same objects as a JSON file; --single-mask and refinement pass through
    (tmp_path / "objects.json").write_text(json.dumps(PROMPTS[:2]))
    assert main(["segment", str(files / "photo.png"), "--sam", str(files / "tiny_sam.pth"), "--device", "cpu",
                 "--prompts", str(tmp_path / "objects.json"), "--out", str(tmp_path / "json"),
                 "--single-mask", "--dilate", "1", "--feather", "1"]) == 0  # fmt: skip
    single = segmenter.segment(PROMPTS[:1], multimask=False, dilate=1, feather=1.0)[0]
    with Image.open(tmp_path / "json" / "mask_1.png") as written:
        assert np.array_equal(np.asarray(written), np.asarray(to_pil(single)))


def test_cli_user_masks_need_no_sam_and_default_out_dir(files, capsys):
    assert main(["segment", str(files / "photo.png"), "--mask", str(files / "drawn.png")]) == 0
    assert (files / "photo_masks" / "mask_1.png").is_file() and (files / "photo_masks" / "preview.png").is_file()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "nothing to segment"),
        (["--object", "box=1,1,9,9"], "--sam is needed"),
        (["--sam", "S", "--object", "box=1,1,9,9", "--prompts", "[]"], "either with --object or with --prompts"),
        (["--sam", "S", "--object", "bx=1,1,9,9"], "--object 1: cannot read 'bx=1,1,9,9'"),
        (["--sam", "S", "--object", "point=1,1", "--object", "box=1,1,99,9"], "--object 2: box .* outside"),
        (["--sam", "S", "--prompts", "objects.json"], "neither JSON"),
        (["--sam", "S", "--prompts", '[{"box": [1, 1]}]'], r"prompts\[0\] \(object 1\): box must be 4"),
        (["--sam", "S", "--object", "point=1,1"], "SAM checkpoint not found: S"),
        (["--mask", "drawn.png", "--feather", "-2"], "feather must be"),
    ],
)
def test_cli_segment_errors(files, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(files)
    assert main(["segment", "photo.png", "--out", "errors", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("protobooth segment: error:")
    assert re.search(message, error), error
    assert not (files / "errors").exists()


def test_cli_segment_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["segment", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--sam", "--object", "--prompts", "--mask", "--out", "--dilate", "--feather", "--single-mask", "--device"):
        assert option in text
    for default in ("(default: 0)", "(default: 0.0)", "(default: False)", "(default: auto)", "box=X0,Y0,X1,Y1"):
        assert default in text


def test_cli_segment_as_a_subprocess(files, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "protobooth.engine.cli", "segment", str(files / "photo.png"),
         "--sam", str(files / "tiny_sam.pth"), "--device", "cpu", "--prompts", json.dumps(PROMPTS),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask_1.png", "mask_2.png", "mask_3.png", "mask_4.png", "preview.png"]
    assert result.stdout.count("wrote ") == 5
    assert "image embedding" in result.stderr  # the progress bar
