"""What pretraining an object encoder costs per sample at SD1.5 size: the numbers behind the README's estimate for a
GPU cluster.

The model is SD1.5's UNet, VAE and CLIP-L text encoder with seeded random weights (train_speed.build_model) and a
CLIP ViT-L/14-size vision tower, also random: speed and operation counts do not depend on the weights. The data is a
generated identity-folder set (engine/encoder/sources.py: IdentityFolders) at the training size. One process, batch 1,
the encoder at the research spec's size (width 256, 4 layers, K = 4). Two kinds of sample are timed and counted:

- plain: the diffusion loss alone (general samples, dropped objects, and identity samples at t ≥ identity_below);
- identity: plus the identity-preservation loss (the VAE decoder and the identity tower, forward and backward).

    python benchmarks/encoder_cost.py                    # 256 px, 3 timed steps per kind (about 4 minutes here)
    python benchmarks/encoder_cost.py --resolution 512 --steps 1

Floating-point operations are counted by torch's FlopCounterMode (matrix products and convolutions, forward and
backward), so they hold on any device; the seconds are this machine's.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def vision_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from protobooth.engine.prototype import ClipTowers

    torch.manual_seed(1)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=768, hidden_act="quick_gelu")).eval()  # OpenAI CLIP ViT-L/14's shape
    return ClipTowers(None, None, vision.vision_model, vision.visual_projection, 224)


def write_identities(root: Path, size: int) -> None:
    """Four identities of two photos each (a coloured disc in two places on two backgrounds) and one general picture."""
    from PIL import Image, ImageDraw

    for identity, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 180, 30), (200, 200, 30)]):
        folder = root / "objects" / f"object{identity}"
        folder.mkdir(parents=True)
        (folder / "class.txt").write_text("ball")
        for index, left in enumerate((size // 8, size // 2)):
            photo, mask = Image.new("RGB", (size, size), (60 + 120 * index,) * 3), Image.new("L", (size, size), 0)
            box = (left, size // 4, left + size * 3 // 8, size * 5 // 8)
            ImageDraw.Draw(photo).ellipse(box, fill=colour)
            ImageDraw.Draw(mask).ellipse(box, fill=255)
            photo.save(folder / f"p{index}.png")
            mask.save(folder / f"p{index}.mask.png")
    (root / "general").mkdir()
    Image.new("RGB", (size, size), (90, 90, 200)).save(root / "general" / "sky.png")
    (root / "general" / "sky.txt").write_text("a blue sky over the sea")


def measure(model, towers, source, steps: int, identity: bool, work: Path) -> tuple[float, float]:
    """(median seconds per sample after one warm-up step, GFLOP per sample) for one kind of sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from protobooth.engine.encoder.pretrain import PretrainSettings, pretrain

    settings = PretrainSettings(steps=steps + 1, batch_size=1, general_share=0.0, drop_probability=0.0,
                                identity_below=1000 if identity else 0, identity_weight=0.05 if identity else 0.0)
    marks = []
    counter = FlopCounterMode(display=False)
    with counter:
        pretrain(model, towers, source, settings, work / f"{identity}.safetensors",
                 progress=lambda step, total, loss: marks.append(time.perf_counter()))
    seconds = sorted(b - a for a, b in zip(marks, marks[1:]))
    return seconds[len(seconds) // 2], counter.get_total_flops() / (steps + 1) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kind (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from train_speed import build_model

    from protobooth.engine.encoder.sources import IdentityFolders

    model, towers = build_model("sd15", "cpu"), vision_tower()
    with tempfile.TemporaryDirectory() as folder:
        write_identities(Path(folder) / "data", args.resolution)
        source = IdentityFolders(Path(folder) / "data", need_general=False, size=args.resolution)
        print(f"SD1.5 size (random weights), CLIP ViT-L/14-size vision tower, {args.resolution} px, batch 1, "
              f"{args.threads} thread(s), {torch.get_num_threads()} used; encoder width 256, 4 layers")
        for identity in (False, True):
            seconds, gflop = measure(model, towers, source, args.steps, identity, Path(folder))
            kind = "identity" if identity else "plain"
            print(f"{kind:9s} sample: {seconds:7.2f} s median over {args.steps} step(s), {gflop:9.1f} GFLOP")


if __name__ == "__main__":
    main()
