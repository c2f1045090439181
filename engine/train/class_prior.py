"""Class images for the class-characterising (prior) regularisation, generated once and cached on disk.

The frozen base model draws images from a class prompt ("a photo of a cat"); training then keeps the
model able to draw them, so learning one cat does not turn every cat into it. Generation is the slow
part, so results are cached as latents, keyed by model fingerprint, prompt, count, seed and sampler
settings. The cache folder is the one a caller gives, else cache_dir(): $PROTOBOOTH_CACHE/class-latents when
that is set, else the caller's default (inside ComfyUI a folder in its user directory, see nodes/train.py), else
~/.cache/protobooth/class-latents. It is kept under a size bound (CACHE_LIMIT_BYTES, or
$PROTOBOOTH_CACHE_LIMIT_MB), least recently used entries first out.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainingCancelled
from ..fileio import save_safetensors

log = logging.getLogger("protobooth")

# One entry is a few images' latents: 256 KiB for four 512-px SD images, 1 MiB at 1024 px. 1 GiB holds
# thousands of them, enough for every class a user trains in a long while.
CACHE_LIMIT_BYTES = 1 << 30


def cache_dir(default: Path | None = None) -> Path:
    configured = os.environ.get("PROTOBOOTH_CACHE")
    if configured:
        return Path(configured) / "class-latents"
    return Path(default) if default is not None else Path.home() / ".cache" / "protobooth" / "class-latents"


def cache_limit() -> int:
    configured = os.environ.get("PROTOBOOTH_CACHE_LIMIT_MB")
    return int(float(configured) * 2**20) if configured else CACHE_LIMIT_BYTES


def trim_cache(directory: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries until the folder holds at most `limit` bytes; never `keep`.

    A read touches its entry (see class_latents), so the modification time says when it was last used."""
    entries = sorted(directory.glob("*/*.safetensors"), key=lambda path: path.stat().st_mtime)
    total = sum(path.stat().st_size for path in entries)
    removed = []
    for path in entries:
        if total <= limit:
            break
        if path == keep:
            continue
        total -= path.stat().st_size
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("class-image cache over %d MiB: removed the %d least recently used entries", limit >> 20, len(removed))
    return removed


def cache_entry(fingerprint: str, prompt: str, count: int, size: int, seed: int, steps: int = 25,
                guidance: float = 7.5, directory: Path | None = None, weights_key: str | None = None) -> tuple[Path, dict]:
    """(file, key) of the cached class latents for these arguments (see class_latents)."""
    key = {"model": fingerprint, "prompt": prompt, "count": count, "size": size, "seed": seed,
           "steps": steps, "guidance": guidance, "sampler": "ddim"}
    if weights_key is not None:
        key["weights"] = weights_key
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(directory or cache_dir()) / fingerprint / f"{name}.safetensors", key


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
    should_cancel=None,
    weights_key: str | None = None,
) -> torch.Tensor:
    """[count, C, size/f, size/f] latents (already scaled) that the frozen model draws from `prompt`.

    progress(done, total) follows every sampling step (total = count * steps; a cache hit reports it all at
    once). should_cancel() is asked before every image and after every step; True raises TrainingCancelled
    and writes nothing.
    weights_key names whatever sits on top of the base weights and changes the pictures (a LoRA patched on
    upstream in a ComfyUI graph): the fingerprint deliberately ignores attention weights, so without it
    such a model would be served the plain model's class images.
    """
    path, key = cache_entry(model.fingerprint, prompt, count, size, seed, steps, guidance, directory, weights_key)
    total = count * steps
    if path.is_file():
        from safetensors.torch import load_file

        if progress is not None:
            progress(total, total)
        path.touch()  # recently used: the size bound removes other entries first
        return load_file(str(path))["latents"]
    log.info("drawing %d class image(s) for %r with the frozen model (cached for next time)", count, prompt)
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    latents = []
    for index in range(count):

        def step_end(_pipeline, step, _timestep, tensors, done_before=index * steps):
            if progress is not None:
                progress(done_before + step + 1, total)
            _stop_if_cancelled(should_cancel, prompt, index, count)
            return tensors

        _stop_if_cancelled(should_cancel, prompt, index, count)
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            out = pipeline(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=generator, output_type="latent", callback_on_step_end=step_end)
        latents.append(out.images.float().cpu())
    latents = torch.cat(latents)
    # Written only once every image is drawn, atomically: a cancel or crash leaves no partial cache entry.
    save_safetensors({"latents": latents}, path, metadata={"key": json.dumps(key, sort_keys=True)})
    trim_cache(path.parent.parent, cache_limit(), keep=path)
    return latents


def _stop_if_cancelled(should_cancel, prompt: str, index: int, count: int) -> None:
    if should_cancel is not None and should_cancel():
        raise TrainingCancelled(f"cancelled while drawing class image {index + 1} of {count} for {prompt!r}; "
                                "nothing was cached")


@dataclass(frozen=True)
class ClassImages:
    """What the class prior's images cost a run: class words, how many of them had to be drawn (the rest came
    from the cache) and the seconds spent (drawing, or reading the cache)."""

    classes: int
    drawn: int
    seconds: float

    def __str__(self) -> str:
        if not self.drawn:
            return f"class images: from the cache ({self.seconds:.1f} s)"
        return f"class images: drawn for {self.drawn} of {self.classes} class word(s) in {self.seconds:.1f} s (cached now)"
