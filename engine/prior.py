"""Class images for the class-characterising (prior) regularisation, generated once and cached on disk.

The frozen base model draws images from a class prompt ("a photo of a cat"); training then keeps the
model able to draw them, so learning one cat does not turn every cat into it. Generation is the slow
part, so results are cached as latents, keyed by model fingerprint, prompt, count, seed and sampler
settings, under ~/.cache/protobooth/class-latents (or $PROTOBOOTH_CACHE).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .fileio import save_safetensors

log = logging.getLogger("protobooth")


def cache_dir() -> Path:
    root = os.environ.get("PROTOBOOTH_CACHE") or Path.home() / ".cache" / "protobooth"
    return Path(root) / "class-latents"


def class_latents(
    model,
    prompt: str,
    count: int,
    size: int,
    seed: int,
    steps: int = 25,
    guidance: float = 7.5,
    directory: Path | None = None,
    progress=None,
) -> torch.Tensor:
    """[count, C, size/f, size/f] latents (already scaled) that the frozen model draws from `prompt`."""
    key = {"model": model.fingerprint, "prompt": prompt, "count": count, "size": size, "seed": seed,
           "steps": steps, "guidance": guidance, "sampler": "ddim"}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(directory or cache_dir()) / model.fingerprint / f"{name}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))["latents"]
    log.info("drawing %d class image(s) for %r with the frozen model (cached for next time)", count, prompt)
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    latents = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            out = pipeline(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=generator, output_type="latent")
        latents.append(out.images.float().cpu())
        if progress is not None:
            progress(index + 1, count)
    latents = torch.cat(latents)
    save_safetensors({"latents": latents}, path, metadata={"key": json.dumps(key, sort_keys=True)})
    return latents
