"""The adversarial corpus: what a careless or hostile user types, drops or interrupts, and the exact outcome of each.

Every command-line case asserts the exit status, one error line that names the input (no traceback), that no file
in the test's folder changed, that no stray file appeared, and that no pickle payload ran (its marker file never
appears). Then interrupts (SIGINT, kill -9 during a save), a full disk (a file-size limit in a child process, and
ENOSPC in-process), file permissions, and the library's own checks. Tiny models throughout: cases fail in the
pre-flight, before a model loads, unless they are about something only a loaded model can say.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kit.checkpoints import write_single_file
from kit.interrupts import ctrl_c_in_a_finaliser_after
from kit.sam import save_sam_checkpoint, tiny_sam
from protobooth.engine.cli import main
from protobooth.engine.concept.concept import check_concept_name, load_concept
from protobooth.engine.errors import InputError
from protobooth.engine.fileio import TEMP_SUFFIX, atomic_path, save_png
from protobooth.engine.images import load_image
from protobooth.engine.models import tiny

MARKER = "PAYLOAD_RAN"


class Payload:
    """A pickle that writes the marker file if it is ever unpickled."""

    def __init__(self, folder: Path):
        self.path = str(folder / MARKER)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height in its header and holds no pixel data: cheap to write, huge to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every file the cases hand to the commands: good ones and bad ones."""
    root = tmp_path_factory.mktemp("corpus")
    photo = np.full((64, 64, 3), 110, dtype=np.uint8)
    photo[16:48, 12:40] = (230, 60, 30)
    Image.fromarray(photo).save(root / "photo.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 12:40] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:32, :32]).save(root / "mask_small.png")
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(root / "mask_black.png")
    Image.fromarray(np.full((64, 64), 1, dtype=np.uint8)).save(root / "mask_faint.png")
    thin = np.zeros((64, 64), dtype=np.uint8)
    thin[30:33, 10:50] = 255
    Image.fromarray(thin).save(root / "mask_thin.png")
    Image.fromarray(photo[:4, :4]).save(root / "speck.png")
    Image.fromarray(photo).save(root / "photo.jpg", quality=90)
    (root / "truncated.jpg").write_bytes((root / "photo.jpg").read_bytes()[:200])
    (root / "text.png").write_text("not a picture\n")
    (root / "empty.png").write_bytes(b"")
    (root / "huge.png").write_bytes(png_header(30000, 30000))
    (root / "big.png").write_bytes(png_header(12000, 12000))
    (root / "a_file").write_text("a file, not a folder\n")
    tiny.tiny_model(0).pipeline().save_pretrained(root / "model")
    write_single_file(tiny.tiny_model(0, family="sdxl"), root / "sdxl.safetensors")
    save_sam_checkpoint(tiny_sam(0), root / "sam.pth")
    torch.save(Payload(root), root / "hostile.ckpt")  # torch's own format, as a published .ckpt is
    (root / "hostile_sam.pth").write_bytes(pickle.dumps(Payload(root)))  # a bare pickle
    torch.save({"state_dict": Payload(root)}, root / "hostile_nested.ckpt")
    (root / "damaged.ckpt").write_bytes(os.urandom(4096))
    torch.save([1, 2, 3], root / "list.ckpt")
    (root / "fake.safetensors").write_text("{\"not\": \"safetensors\"}")
    (root / "clip_noconfig").mkdir()
    (root / "clip_hostile").mkdir()
    (root / "clip_hostile" / "config.json").write_text(tiny.tiny_clip().config.to_json_string())
    (root / "clip_hostile" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(root)))
    shutil.copytree(root / "model", root / "model_hostile")
    for weights in (root / "model_hostile" / "unet").glob("*.safetensors"):
        weights.unlink()
    (root / "model_hostile" / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(root)))
    return root


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


# (id, arguments with {r} = the corpus folder and {c} = the case's own folder, exit status, the error line's pattern,
#  files to put in the case's folder first: {relative path: bytes or a callable(root) -> bytes}, environment)
TRAIN = ["train", "{r}/photo.png", "--model", "{r}/model", "--token", "zqcat", "--class", "cat", "--mask", "{r}/mask.png",
         "--out", "{c}/out", "--steps", "2", "--prior-weight", "0"]


def train(*changes: str, drop: tuple[str, ...] = ()) -> list[str]:
    """TRAIN with flags replaced or added: train("--token", "x") replaces --token's value."""
    argv = list(TRAIN)
    for flag in drop:
        index = argv.index(flag)
        del argv[index : index + 2]
    pending = list(changes)
    while pending:
        flag = pending.pop(0)
        value = pending.pop(0) if pending and not pending[0].startswith("--") else None
        if flag in argv and value is not None:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] + ([value] if value is not None else [])
    return argv


GENERATE = ["generate", "a photo of a cat", "--model", "{r}/model", "--out", "{c}/images", "--steps", "2"]
SEGMENT = ["segment", "{r}/photo.png", "--mask", "{r}/mask.png", "--out", "{c}/masks"]


def checkpoint_with(state) -> callable:
    def write(root: Path) -> bytes:
        import io

        buffer = io.BytesIO()
        torch.save(state(root) if callable(state) else state, buffer)
        return buffer.getvalue()

    return write


CKPT = "out/zqcat-checkpoint/checkpoint.pt"
CASES = [
    # images (11)
    ("image-missing", [*TRAIN[:1], "{r}/nothing.png", *TRAIN[2:]], 2, r"image file not found", None, None),
    ("image-is-text", [*TRAIN[:1], "{r}/text.png", *TRAIN[2:]], 2, r"image .*text\.png is not a readable image", None, None),
    ("image-empty-file", [*TRAIN[:1], "{r}/empty.png", *TRAIN[2:]], 2, r"empty\.png is not a readable image", None, None),
    ("image-30000px-bomb", [*TRAIN[:1], "{r}/huge.png", *TRAIN[2:]], 2, r"huge\.png is .*over the limit", None, None),
    ("image-12000px", [*TRAIN[:1], "{r}/big.png", *TRAIN[2:]], 2, r"12000x12000 = 144,000,000 pixels, over the limit of 50,000,000",
     None, None),
    ("image-over-own-limit", TRAIN, 2, r"photo\.png is 64x64 = 4,096 pixels, over the limit of 1,000; .*PROTOBOOTH_MAX_PIXELS", None,
     {"PROTOBOOTH_MAX_PIXELS": "1000"}),
    ("image-limit-not-a-number", TRAIN, 2, r"PROTOBOOTH_MAX_PIXELS='lots' is not a pixel count", None,
     {"PROTOBOOTH_MAX_PIXELS": "lots"}),
    ("image-4px", [*TRAIN[:1], "{r}/speck.png", *TRAIN[2:]], 2, r"only 4x4 pixels", None, None),
    ("image-truncated-jpeg", [*TRAIN[:1], "{r}/truncated.jpg", *TRAIN[2:]], 2, r"truncated\.jpg is not a readable image",
     None, None),
    ("image-is-folder", [*TRAIN[:1], "{r}/model", *TRAIN[2:]], 2, r"image file not found: .*model", None, None),
    ("segment-image-bomb", ["segment", "{r}/huge.png", "--mask", "{r}/mask.png", "--out", "{c}/m"], 2,
     r"IMAGE .*huge\.png is .*over the limit", None, None),
    # masks (10)
    ("mask-other-size", train("--mask", "{r}/mask_small.png"), 2, r"mask 1 \(zqcat\) is 32x32 but the image is 64x64", None, None),
    ("mask-black", train("--mask", "{r}/mask_black.png"), 2, r"mask 1 \(zqcat\) is empty", None, None),
    ("mask-faint", train("--mask", "{r}/mask_faint.png"), 2, r"no pixel at half brightness .*its brightest is 1 of 255", None,
     None),
    ("mask-missing", train("--mask", "{r}/nothing.png"), 2, r"--mask 1 file not found", None, None),
    ("mask-not-image", train("--mask", "{r}/text.png"), 2, r"--mask 1 .*text\.png is not a readable image", None, None),
    ("masks-more-than-tokens", [*TRAIN, "--mask", "{r}/mask.png"], 2,
     r"1 token\(s\) but 2 mask\(s\)/box\(es\)", None, None),
    ("box-without-sam", [*train(drop=("--mask",)), "--box", "12", "16", "40", "48"], 2, r"--box needs --sam", None, None),
    ("segment-dilate-huge", [*SEGMENT, "--dilate", "-1000"], 2, r"dilate must be a whole number of pixels from -512 to 512",
     None, None),
    ("segment-dilate-erases", ["segment", "{r}/photo.png", "--mask", "{r}/mask_thin.png", "--out", "{c}/m", "--dilate", "-3"],
     2, r"mask of object 1 is empty after dilate -3", None, None),
    ("segment-feather-negative", [*SEGMENT, "--feather", "-1"], 2, r"feather must be a blur radius", None, None),
    # words (10)
    ("token-empty", train("--token", ""), 2, r"a token name is empty", None, None),
    ("token-with-space", train("--token", "zq cat"), 2, r"token 'zq cat' may only contain", None, None),
    ("token-known-word", train("--token", "dog"), 2, r"token 'dog' is already a word the text encoder knows", None, None),
    ("token-is-class", train("--token", "zqcat", "--class", "zqcat"), 2, r"token 'zqcat' equals its class word", None, None),
    ("tokens-overlap", [*train("--mask", "{r}/mask.png"), "--token", "zqcatx", "--class", "cat", "--mask", "{r}/mask.png"],
     2, r"token names 'zqcat' and 'zqcatx' overlap", None, None),
    ("class-too-long", train("--class", " ".join(["cat"] * 100)), 2, r"is 100 text pieces; a prompt holds 75", None, None),
    ("class-empty", train("--class", ""), 2, r"class word '' for token 'zqcat' tokenises to nothing", None, None),
    ("tokens-and-classes-differ", [*TRAIN, "--class", "dog"], 2, r"1 token name\(s\) but 2 class word\(s\)", None, None),
    ("token-not-a-file-name", train("--token", "<zqcat>"), 2, r"named after its first token .* Give --name", None, None),
    ("token-too-long-for-a-name", train("--token", "zq" * 100), 2, r"named after its first token .*200 bytes.* Give --name",
     None, None),
    # names (6)
    ("name-with-space", train("--name", "my mug"), 2, r"contains a space, which `embedding:my mug`", None, None),
    ("name-escapes", train("--name", "../evil"), 2, r"concept name '\.\./evil' cannot be a file name", None, None),
    ("name-hidden", train("--name", ".hidden"), 2, r"concept name '\.hidden' cannot be a file name", None, None),
    ("name-300-bytes", train("--name", "n" * 300), 2, r"is 300 bytes; .*at most 160", None, None),
    ("name-colon", train("--name", "c:x"), 2, r"\(it contains ':'\)", None, None),
    ("name-empty", train("--name", " "), 2, r"concept name '' cannot be a file name", None, None),
    # settings (12)
    ("steps-zero", train("--steps", "0"), 2, r"steps must be at least 1 \(got 0\)", None, None),
    ("steps-not-a-number", train("--steps", "many"), 2, r"argument --steps: invalid int value: 'many'", None, None),
    ("learning-rate-nan", train("--token-learning-rate", "nan"), 2, r"token learning rate must be a finite number", None, None),
    ("rank-zero", train("--lora-rank", "0"), 2, r"LoRA rank must be at least 1 \(got 0\)", None, None),
    ("rank-above-width", train("--lora-rank", "64"), 2, r"LoRA rank 64 is above 32, the width of the narrowest layer", None,
     None),
    ("resolution-odd", train("--resolution", "60"), 2, r"resolution 60 must be a multiple of 8", None, None),
    ("fp16-on-cpu", train("--mixed-precision", "fp16", "--device", "cpu"), 2, r"fp16", None, None),
    ("foreign-method-flag", train("--method", "textboost", "--lora-rank", "4", drop=("--prior-weight",)), 2,
     r"--lora-rank belong\(s\) to another method than --method textboost", None, None),
    ("unknown-augmentation", train("--method", "textboost", "--augmentation", "solarize", drop=("--prior-weight",)), 2,
     r"augmentation 'solarize' does not exist", None, None),
    ("prior-weight-negative", train("--prior-weight", "-1"), 2, r"prior weight must not be negative", None, None),
    ("no-gpu", train("--device", "cuda"), 2, r"--device cuda: this PyTorch sees no CUDA GPU", None, None),
    ("unknown-flag", train("--stepz", "4"), 2, r"unrecognized arguments: --stepz", None, None),
    # paths and output (9)
    ("out-is-file", train("--out", "{r}/a_file"), 2, r"--out .*a_file is a file, not a folder", None, None),
    ("out-below-a-file", train("--out", "{r}/a_file/out"), 2, r"a_file \(inside --out .*\) is a file, not a folder", None,
     None),
    ("out-unwritable", train("--out", "/proc/1/protobooth-out"), 2, r"cannot write in /proc/1 \(permission denied\)", None,
     None),
    ("out-loras-is-file", TRAIN, 2, r"out/loras \(inside --out .*\) is a file, not a folder", {"out/loras": b"x"}, None),
    ("model-missing", train("--model", "{r}/nothing.safetensors"), 2, r"--model .*nothing\.safetensors does not exist", None,
     None),
    ("model-not-safetensors", train("--model", "{r}/fake.safetensors"), 2, r"fake\.safetensors is not a readable safetensors",
     None, None),
    ("sam-missing", [*train(drop=("--mask",)), "--box", "12", "16", "40", "48", "--sam", "{r}/nothing.pth"], 2,
     r"--sam .*nothing\.pth does not exist", None, None),
    ("clip-without-config", train("--clip", "{r}/clip_noconfig"), 2, r"--clip .*clip_noconfig is not a CLIP model folder", None,
     None),
    ("concept-exists", TRAIN, 2, r"concept 'zqcat' already exists in .*out; pass --overwrite",
     {"out/embeddings/zqcat.safetensors": b"x"}, None),
    # weight files (13)
    ("model-pickle-payload", train("--model", "{r}/hostile.ckpt"), 2, r"hostile\.ckpt can only be opened by running code", None,
     None),
    ("model-nested-payload", train("--model", "{r}/hostile_nested.ckpt"), 2, r"hostile_nested\.ckpt can only be opened by", None,
     None),
    ("model-damaged", train("--model", "{r}/damaged.ckpt"), 2, r"damaged\.ckpt is not a readable PyTorch file", None, None),
    ("model-a-list", train("--model", "{r}/list.ckpt"), 2, r"list\.ckpt holds a list, not a dictionary", None, None),
    ("model-folder-payload", train("--model", "{r}/model_hostile"), 2, r"Could not load the diffusers model in .*model_hostile",
     None, None),
    ("sam-pickle-payload", [*train(drop=("--mask",)), "--box", "12", "16", "40", "48", "--sam", "{r}/hostile_sam.pth"], 2,
     r"SAM checkpoint .*hostile_sam\.pth could not be read as weights", None, None),
    ("clip-folder-payload", train("--clip", "{r}/clip_hostile"), 2, r"--clip .*clip_hostile could not be loaded as a CLIP", None,
     None),
    ("resume-pickle-payload", train("--resume"), 2, r"checkpoint .*checkpoint\.pt can only be opened by running code",
     {CKPT: checkpoint_with(Payload)}, None),
    ("resume-bare-pickle", train("--resume"), 2, r"checkpoint .*checkpoint\.pt is not a readable PyTorch file",
     {CKPT: lambda root: pickle.dumps(Payload(root))}, None),
    ("resume-damaged", train("--resume"), 2, r"checkpoint .*checkpoint\.pt is not a readable PyTorch file",
     {CKPT: os.urandom(512)}, None),
    ("resume-foreign", train("--resume"), 2, r"--resume: .*checkpoint\.pt is not a ProtoBooth training checkpoint",
     {CKPT: checkpoint_with({"weights": torch.zeros(3)})}, None),
    ("resume-other-settings", train("--resume"), 2, r"was made with other settings \(steps\)",
     {CKPT: lambda root: resumable_checkpoint(root, steps=7)}, None),
    ("resume-missing", train("--resume"), 2, r"--resume: there is no checkpoint at", None, None),
    # generate (9)
    ("generate-steps-zero", [*GENERATE, "--steps", "0"], 2, r"steps 0 must be a whole number from 1 to 1000", None, None),
    ("generate-size-odd", [*GENERATE, "--size", "100"], 2, r"size 100 must be a multiple of 8", None, None),
    ("generate-guidance-nan", [*GENERATE, "--guidance", "nan"], 2, r"guidance nan must be a number", None, None),
    ("generate-seed-negative", [*GENERATE, "--seed", "-1"], 2, r"seed -1 must be a whole number", None, None),
    ("generate-lora-missing", [*GENERATE, "--concept", "{r}/model/unet/config.json", "--lora", "{r}/nothing.safetensors"], 2,
     r"--lora .*nothing\.safetensors does not exist", None, None),
    ("generate-concept-not-safetensors", [*GENERATE, "--concept", "{r}/fake.safetensors"], 2,
     r"embedding .*fake\.safetensors is not a readable safetensors file", None, None),
    ("generate-concept-other-width", [*GENERATE, "--concept", "{c}/wide.safetensors"], 2,
     r"vectors for 'zqwide' are 48 wide but this model's text encoder takes 32",
     {"wide.safetensors": lambda root: concept_bytes("sd1", (48,), "zqwide")}, None),
    # A concept of another family is refused from the files' headers, before the model loads.
    ("generate-sd1-concept-on-sdxl", ["generate", "a photo of a cat", "--model", "{r}/sdxl.safetensors", "--out",
     "{c}/images", "--concept", "{c}/sd1.safetensors"], 2,
     r"concept was trained on an SD1 model but --model .*sdxl\.safetensors is an SDXL model",
     {"sd1.safetensors": lambda root: concept_bytes("sd1", (tiny.TEXT_WIDTH,), "zqcat")}, None),
    ("generate-sdxl-concept-on-sd1", [*GENERATE, "--concept", "{c}/xl.safetensors"], 2,
     r"concept was trained on an SDXL model but --model .*model is an SD1 model",
     {"xl.safetensors": lambda root: concept_bytes("sdxl", (tiny.TEXT_WIDTH, tiny.BIG_G_WIDTH), "zqcat")}, None),
    # demo (2)
    ("demo-steps-zero", ["demo", "--model", "tiny", "--steps", "0", "--out", "{c}/demo"], 2, r"--steps 0 must be at least 1",
     None, None),
    ("demo-out-is-file", ["demo", "--model", "tiny", "--out", "{r}/a_file"], 2, r"--out .*a_file is a file", None, None),
]


def resumable_checkpoint(root: Path, steps: int) -> bytes:
    """A real checkpoint of the TRAIN run, made with other steps."""
    from protobooth.engine.models.loading import load_model
    from protobooth.engine.train import OneShotTrainer, TrainSettings

    settings = TrainSettings.from_values(steps=steps, prior_weight=0.0, checkpoint_every=1)
    folder = root / "resumable"
    with OneShotTrainer(load_model(root / "model"), root / "photo.png", [root / "mask.png"], ["zqcat"], ["cat"],
                        settings) as trainer:
        trainer.train(checkpoint_dir=folder)
    data = (folder / "checkpoint.pt").read_bytes()
    shutil.rmtree(folder)
    return data


def concept_bytes(family: str, widths: tuple[int, ...], token: str) -> bytes:
    """The embedding file of a made-up `family` concept: one vector for `token`, one part per width (text encoder)."""
    from protobooth.engine.concept.concept import Concept, ConceptObject, save_concept

    concept = Concept([ConceptObject(token, "cat", torch.ones(1, sum(widths)))], {}, family, "unknown", {}, "0",
                      text_widths=widths if len(widths) > 1 else ())
    folder = Path(os.environ["PROTOBOOTH_TEST_SCRATCH"])
    save_concept(concept, folder / "w_lora.safetensors", folder / "w.safetensors")
    data = (folder / "w.safetensors").read_bytes()
    (folder / "w.safetensors").unlink()
    return data


def test_the_corpus_is_big_enough():
    assert len(CASES) + len(OTHER_CASES) >= 60
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_named_in_one_line_and_changes_nothing(case, root, tmp_path, capsys, monkeypatch):
    name, argv, status, pattern, files, env = case
    monkeypatch.setenv("PROTOBOOTH_TEST_SCRATCH", str(tmp_path))
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    for relative, content in (files or {}).items():
        target = case_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content(root) if callable(content) else content)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    argv = [part.replace("{r}", str(root)).replace("{c}", str(case_dir)) for part in argv]
    before_root, before_case = snapshot(root), snapshot(case_dir)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    assert code == status, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("protobooth"), err[-2000:]
    assert re.search(pattern, lines[-1]), lines[-1]
    assert snapshot(root) == before_root
    assert snapshot(case_dir) == before_case  # nothing written, nothing removed, no stray temporary file
    assert not (root / MARKER).exists() and not Path(MARKER).exists()


# ----------------------------------------------------------------------------------------------------------------
# interrupts, a full disk, permissions and the library's own checks

OTHER_CASES = ["sigint-while-training", "sigint-with-checkpoint", "sigterm-while-training", "sigint-in-a-finaliser",
               "kill-9-during-save", "interrupt-inside-save",
               "file-size-limit", "disk-full-keeps-result", "umask-022", "umask-077", "class-cache-mode", "exif-portrait",
               "generate-library-steps", "name-with-space-library"]


def _cli(root: Path, argv: list[str], env: dict | None = None, preexec=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "protobooth.engine.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, preexec_fn=preexec, cwd=root)


class _Reader:
    """Collects a stream in a thread, so a test can wait for a line without blocking."""

    def __init__(self, stream):
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for chunk in iter(lambda: stream.read1(256), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < end, f"never saw {needle!r}: {self.text[-2000:]}"
            time.sleep(0.1)


def _long_training(root: Path, out: Path, *extra: str) -> list[str]:
    return [*(part.replace("{r}", str(root)) for part in TRAIN[:-6]), "--out", str(out), "--steps", "100000",
            "--prior-weight", "0", *extra]


@pytest.mark.parametrize("sent, checkpoint", [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["sigint-while-training", "sigint-with-checkpoint", "sigterm-while-training"])
def test_ctrl_c_while_training_exits_130_with_one_line_and_writes_nothing_but_a_checkpoint(root, tmp_path, sent,
                                                                                         checkpoint):
    out = tmp_path / "out"
    extra = ("--checkpoint-every", "1") if checkpoint else ()
    # A shell runs a background job with SIGINT ignored, and the child would inherit that: give it Ctrl-C's default.
    child = _cli(root, _long_training(root, out, *extra), preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        err = _Reader(child.stderr)
        err.wait_for("train:")
        if checkpoint:
            end = time.monotonic() + 60
            while not (out / "zqcat-checkpoint" / "checkpoint.pt").exists():
                assert time.monotonic() < end
                time.sleep(0.1)
        child.send_signal(sent)
        assert child.wait(timeout=60) == 130
    finally:
        child.kill()  # a 100000-step run must never outlive a failed test
    err.thread.join(timeout=10)
    assert "Traceback" not in err.text and "KeyboardInterrupt" not in err.text
    last = err.text.strip().splitlines()[-1]
    if checkpoint:
        assert re.fullmatch(r"protobooth train: cancelled; checkpoint kept at .*zqcat-checkpoint \(continue with --resume\)\.",
                            last), last
        assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["checkpoint.pt"]
    else:
        assert last == "protobooth train: cancelled; nothing written.", last
        assert not out.exists()


def test_ctrl_c_lost_in_a_finaliser_still_stops_training_at_the_next_step(root, tmp_path, monkeypatch, capsys):
    from protobooth.engine.train.trainer import OneShotTrainer

    steps_run = ctrl_c_in_a_finaliser_after(OneShotTrainer, 2, monkeypatch)
    out = tmp_path / "out"
    argv = [*(part.replace("{r}", str(root)) for part in TRAIN[:-6]), "--out", str(out), "--steps", "40",
            "--prior-weight", "0"]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook) == handlers
    assert len(steps_run) == 2, "the step after the lost interrupt should not run"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Exception ignored" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "protobooth train: cancelled; nothing written."
    assert not out.exists()


def test_a_temporary_file_left_by_a_killed_save_goes_the_next_time_its_folder_is_written(tmp_path):
    holder = ("import sys, time\nfrom protobooth.engine.fileio import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'x' * 100000)\n    print('ready', flush=True)\n"
              "    time.sleep(120)\n")
    killed = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "concept.safetensors")], stdout=subprocess.PIPE)
    alive = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "other.safetensors")], stdout=subprocess.PIPE)
    try:
        assert killed.stdout.readline().strip() == b"ready" and alive.stdout.readline().strip() == b"ready"
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        temps = sorted(tmp_path.glob(f".*{TEMP_SUFFIX}"))
        assert len(temps) == 2 and not (tmp_path / "concept.safetensors").exists()
        save_png(Image.new("RGB", (8, 8)), tmp_path / "picture.png")  # any write to the folder
        left = sorted(tmp_path.glob(f".*{TEMP_SUFFIX}"))
        assert len(left) == 1 and str(alive.pid) in left[0].name  # the live writer's file is not touched
    finally:
        alive.kill()
        alive.wait(timeout=30)


def test_an_interrupt_inside_a_save_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "concept.safetensors"
    target.write_bytes(b"the old concept")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a new conc")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"the old concept"
    assert [p.name for p in tmp_path.iterdir()] == ["concept.safetensors"]


def test_a_file_size_limit_at_save_time_is_one_line_and_no_half_concept(root, tmp_path):
    out = tmp_path / "out"

    def limit():  # in the child: files over 2 KB fail to write (ignoring SIGXFSZ, as the CLI does, from the start)
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    argv = [*(part.replace("{r}", str(root)) for part in TRAIN[:-6]), "--out", str(out), "--steps", "2", "--prior-weight", "0"]
    (tmp_path / "tmp").mkdir()
    child = _cli(root, argv, env={"TMPDIR": str(tmp_path / "tmp"), "PYTHONDONTWRITEBYTECODE": "1"}, preexec=limit)
    _, err = child.communicate(timeout=300)
    err = err.decode()
    assert child.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"protobooth train: error: could not write .*zqcat.* \(File too large\), nor a recovery copy", last), last
    assert "train again (the same seed gives the same result)" in last
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no LoRA without its embedding, no temporary files


def test_a_full_disk_at_save_time_keeps_the_trained_concept_in_a_recovery_folder(root, tmp_path, monkeypatch, capsys):
    import tempfile

    out = tmp_path / "out"
    real_replace = os.replace

    def full_disk(source, target):
        if str(target).startswith(str(out)):
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    argv = [*(part.replace("{r}", str(root)) for part in TRAIN[:-6]), "--out", str(out), "--steps", "2", "--prior-weight", "0"]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    match = re.search(r"No space left on device\)\. The trained concept is safe in (\S+): copy its loras/", last)
    assert match, last
    recovery = Path(match.group(1))
    concept = load_concept(recovery / "embeddings" / "zqcat.safetensors", recovery / "loras" / "zqcat.safetensors")
    assert concept.tokens == ["zqcat"] and concept.lora
    assert [p for p in out.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask-022", "umask-077"])
def test_files_are_written_with_the_users_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_png(Image.new("RGB", (8, 8)), tmp_path / "picture.png")
        with atomic_path(tmp_path / "sub" / "weights.bin") as tmp:
            tmp.write_bytes(b"w")
    finally:
        os.umask(previous)
    for path in (tmp_path / "picture.png", tmp_path / "sub" / "weights.bin"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_class_image_cache_files_follow_the_umask_too(tmp_path):
    from protobooth.engine.train import TrainSettings, train_concept

    previous = os.umask(0o022)
    try:
        image = load_image(np.asarray(Image.new("RGB", (64, 64), (120, 90, 60))))
        mask = torch.zeros(64, 64)
        mask[16:48, 16:48] = 1
        settings = TrainSettings.from_values(steps=1, prior_images=1, prior_steps=1)
        train_concept(tiny.tiny_model(0), image, [mask], ["zqcat"], ["cat"], settings, prior_cache=tmp_path / "cache")
    finally:
        os.umask(previous)
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert cached and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in cached)


def test_a_phone_photo_is_turned_upright_as_its_exif_says(tmp_path):
    landscape = np.zeros((48, 64, 3), dtype=np.uint8)
    landscape[:, :8] = 255  # a white stripe along the stored picture's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; show rotated 90 degrees clockwise
    Image.fromarray(landscape).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg")
    assert tuple(upright.shape) == (3, 64, 48)  # portrait, as ComfyUI's Load Image shows it
    assert upright[:, :8, :].mean() > 0.9 and upright[:, -8:, :].mean() < 0.1  # the stripe is now along the top


def test_the_library_refuses_bad_sampling_settings_and_names_with_spaces():
    from protobooth.engine.generate import generate

    with pytest.raises(InputError, match="steps 0 must be a whole number from 1 to 1000"):
        generate(tiny.tiny_model(0), ["a photo of a cat"], steps=0)
    with pytest.raises(InputError, match="contains a space"):
        check_concept_name("my mug")
