"""What one-shot training adds to memory at SD1.5 and SDXL size, with each memory switch, for the nodes' help.

The UNet, VAE and text encoder(s) of SD1.5 or SDXL base with seeded random weights are built in a child process
in the stored dtype given (fp32 as ComfyUI keeps the UNet on a CPU; fp16 or bf16 as on most GPUs) and viewed
through engine/models/precision.py exactly as the node views a graph's models (fp32 compute, weights cast on use);
then the trainer prepares (encodes the photo, reads class images from a pre-filled cache: drawing them at 512 px
takes most of an hour on a CPU) and runs a few steps with the class prior on (a UNet batch of 2). The child
reports the model's bytes and its peak RSS above the RSS after the model was built: the memory training adds on
top of the loaded models. A child whose RSS passes --limit-gib is stopped and reported as over it.

Switches (TrainSettings): none; checkpointing (gradient_checkpointing); frozen-text (train_tokens off, so nothing
in the text path trains and each prompt's conditioning is computed once and cached); both. offload_frozen moves
the VAE and a frozen text encoder off a GPU: on a CPU it changes nothing, so its saving is given as the bytes of
those modules, not measured.

    python benchmarks/training_memory.py                                   # SD1.5, fp32 and fp16 storage, 512 px
    python benchmarks/training_memory.py --size sdxl --stored bfloat16 --switches none checkpointing frozen-text both

Run it alone: it measures process memory, and two big children at once would swap on a 24 GiB machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import import_this_checkout  # noqa: E402

import_this_checkout()

SWITCHES = {"none": {}, "checkpointing": {"gradient_checkpointing": True},
            "frozen-text": {"train_tokens": False, "text_anchor_weight": 0.0},
            "both": {"gradient_checkpointing": True, "train_tokens": False, "text_anchor_weight": 0.0}}


def module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def child(size: str, stored: str, switch: str, resolution: int, steps: int, cache: Path) -> dict:
    import psutil
    import torch

    from protobooth.engine.fileio import save_safetensors
    from protobooth.engine.models.precision import compute_in
    from protobooth.engine.train.class_prior import cache_entry
    from protobooth.engine.train import OneShotTrainer
    from train_speed import CLASS_WORD, TOKEN, build_model, our_settings, scene

    model = build_model(size, "cpu", getattr(torch, stored))  # drawn in the stored dtype: no fp32 copy in the peak
    for module in (model.unet, model.vae, model.text_encoder):
        compute_in(module.requires_grad_(False), torch.float32)
    settings = our_settings(resolution, steps=steps, prior_images=4, prior_steps=25, **SWITCHES[switch])
    path, _ = cache_entry(model.fingerprint, settings.method.class_prompt.format(CLASS_WORD), settings.method.prior_images,
                          resolution, settings.seed, settings.method.prior_steps, settings.method.prior_guidance, cache)
    latent = resolution // 8
    save_safetensors({"latents": torch.randn(settings.method.prior_images, 4, latent, latent)}, path)
    before = psutil.Process().memory_info().rss
    image, mask = scene(resolution)
    with OneShotTrainer(model, image, [mask], [TOKEN], [CLASS_WORD], settings, prior_cache=cache) as trainer:
        result = trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"size": size, "stored": stored, "switch": switch, "resolution": resolution,
            "weights_mib": module_bytes(model.unet) / 2**20 + (module_bytes(model.vae) + module_bytes(model.text_encoder)) / 2**20,
            "offloadable_mib": (module_bytes(model.vae) + module_bytes(model.text_encoder)) / 2**20,
            "training_mib": (peak - before) / 2**20, "seconds_per_step": result.seconds / steps}


def run_child(command: list[str], limit_bytes: int) -> tuple[dict | None, str]:
    """Run one child, stopping it if its RSS passes the limit; (its row or None, what happened)."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = threading.Event()

    def watch():
        handle = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                if handle.memory_info().rss > limit_bytes:
                    stopped.set()
                    process.kill()
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    out, err = process.communicate()
    if stopped.is_set():
        return None, f"over {limit_bytes / 2**30:.0f} GiB RSS (stopped)"
    if process.returncode:
        return None, "failed: " + err.strip().splitlines()[-1] if err.strip() else f"failed ({process.returncode})"
    return json.loads(out.strip().splitlines()[-1]), ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stored", nargs="+", default=["float32", "float16"])
    parser.add_argument("--switches", nargs="+", choices=list(SWITCHES), default=["none"])
    parser.add_argument("--limit-gib", type=float, default=20.0, help="stop a child whose RSS passes this")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        size, stored, switch = args.child
        print(json.dumps(child(size, stored, switch, args.resolution, args.steps, Path(args.cache))))
        return 0
    import tempfile

    print(f"{args.size} size, {args.resolution} px, {args.steps} step(s) with the class prior on (UNet batch 2), CPU, "
          "fp32 compute")
    print("| weights stored in | switch | weights (MiB) | added by training (MiB) | s/step | VAE + text encoders "
          "(MiB, what offload_frozen frees on a GPU) |\n|---|---|---|---|---|---|")
    for stored in args.stored:
        for switch in args.switches:
            with tempfile.TemporaryDirectory() as cache:
                row, problem = run_child([sys.executable, __file__, "--child", args.size, stored, switch, "--cache", cache,
                                          "--resolution", str(args.resolution), "--steps", str(args.steps)],
                                         int(args.limit_gib * 2**30))
            if row is None:
                print(f"| {stored} | {switch} | | {problem} | | |", flush=True)
                continue
            print(f"| {stored} | {switch} | {row['weights_mib']:.0f} | {row['training_mib']:.0f} | "
                  f"{row['seconds_per_step']:.1f} | {row['offloadable_mib']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
