"""What one-shot training adds to memory at SD1.5 size and 512 px, for the Train Concept node's help.

An SD1.5-size UNet, VAE and CLIP-L text encoder with seeded random weights are built in a child process, stored
in the dtype given (fp32 as ComfyUI keeps the UNet on a CPU, fp16 as it does on most GPUs) and viewed through
engine/models/precision.py exactly as the node views a graph's models; then the trainer prepares (encodes the photo,
reads class images from a pre-filled cache: drawing them at 512 px takes most of an hour on a CPU) and runs a few
steps with the class prior on (a UNet batch of 2). The child reports the model's bytes and its peak RSS above
the RSS after the model was built: the memory training adds on top of the loaded models.

    python benchmarks/training_memory.py                 # fp32 and fp16 storage, 512 px, 2 steps
    python benchmarks/training_memory.py --resolution 256 --steps 1

Run it alone: it measures process memory, and two big children at once would swap on a 24 GiB machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import import_this_checkout  # noqa: E402

import_this_checkout()


def child(stored: str, resolution: int, steps: int, cache: Path) -> dict:
    import psutil
    import torch

    from protobooth.engine.fileio import save_safetensors
    from protobooth.engine.models.precision import compute_in
    from protobooth.engine.train.class_prior import cache_entry
    from protobooth.engine.train import OneShotTrainer
    from train_speed import CLASS_WORD, TOKEN, build_model, our_settings, scene

    dtype = getattr(torch, stored)
    model = build_model("sd15", "cpu")
    for module in (model.unet, model.vae, model.text_encoder):
        for parameter in module.parameters():
            parameter.data = parameter.data.to(dtype)
        compute_in(module.requires_grad_(False), torch.float32)
    weights = sum(p.numel() * p.element_size() for m in (model.unet, model.vae, model.text_encoder) for p in m.parameters())
    settings = our_settings(resolution, steps=steps, prior_images=4, prior_steps=25)
    path, _ = cache_entry(model.fingerprint, settings.method.class_prompt.format(CLASS_WORD), settings.method.prior_images,
                          resolution, settings.seed, settings.method.prior_steps, settings.method.prior_guidance, cache)
    latent = resolution // 8
    save_safetensors({"latents": torch.randn(settings.method.prior_images, 4, latent, latent)}, path)
    before = psutil.Process().memory_info().rss
    image, mask = scene(resolution)
    with OneShotTrainer(model, image, [mask], [TOKEN], [CLASS_WORD], settings, prior_cache=cache) as trainer:
        result = trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"stored": stored, "weights_mib": weights / 2**20, "training_mib": (peak - before) / 2**20,
            "seconds_per_step": result.seconds / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stored", nargs="+", default=["float32", "float16"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.resolution, args.steps, Path(args.cache))))
        return 0
    import tempfile

    print(f"SD1.5 size, {args.resolution} px, {args.steps} step(s) with the class prior on (UNet batch 2), CPU, fp32 compute")
    print("| weights stored in | weights (MiB) | added by training (MiB) | s/step |\n|---|---|---|---|")
    for stored in args.stored:
        with tempfile.TemporaryDirectory() as cache:
            out = subprocess.run([sys.executable, __file__, "--child", stored, "--cache", cache, "--resolution",
                                  str(args.resolution), "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {row['stored']} | {row['weights_mib']:.0f} | {row['training_mib']:.0f} | {row['seconds_per_step']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
