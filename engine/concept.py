"""The Concept: what one-shot training produces, and its two files that stock tools load.

- LoRA file: kohya keys (`lora_unet_<diffusers module path with _>.lora_down.weight`/`.lora_up.weight`
  plus an `.alpha` tensor), loaded by ComfyUI's LoraLoader (old and new) and diffusers' load_lora_weights.
- Embedding file: `{"clip_l": [n, dim]}` (SD2: `clip_h`), every object's vectors one row each, in object
  order; the header metadata records which rows belong to which token, the class words, the base model's
  fingerprint and family, the training settings and the software version. ComfyUI reads it through
  `embedding:<name>`, diffusers through load_textual_inversion.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError
from .fileio import save_safetensors
from .version import __version__

log = logging.getLogger("protobooth")

METADATA_KEY = "protobooth"
EMBEDDING_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}
LORA_PREFIX = "lora_unet_"


@dataclass
class ConceptObject:
    token: str
    class_word: str
    vectors: torch.Tensor  # [n_vectors, dim]


@dataclass
class Concept:
    objects: list[ConceptObject]
    lora: dict[str, torch.Tensor]  # kohya keys; empty when only tokens were trained
    family: str
    base_fingerprint: str
    settings: dict = field(default_factory=dict)
    version: str = __version__

    @property
    def tokens(self) -> list[str]:
        return [o.token for o in self.objects]

    def metadata(self) -> dict:
        rows, start = [], 0
        for obj in self.objects:
            rows.append({"token": obj.token, "class_word": obj.class_word, "rows": [start, start + obj.vectors.shape[0]]})
            start += obj.vectors.shape[0]
        return {
            "objects": rows,
            "family": self.family,
            "base_fingerprint": self.base_fingerprint,
            "settings": self.settings,
            "version": self.version,
        }

    def embedding_tensors(self) -> dict[str, torch.Tensor]:
        rows = torch.cat([o.vectors.detach().float().cpu() for o in self.objects])
        return {EMBEDDING_KEYS[self.family]: rows}


def peft_to_kohya(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """UNet LoRA from peft (`<module>.lora_A.weight`/`lora_B`) → kohya keys with alpha tensors."""
    kohya = {}
    for key, value in peft_state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = LORA_PREFIX + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value.detach().float().cpu()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return dict(sorted(kohya.items()))


def check_concept_name(name: str) -> str:
    """A concept name that is safe as a file name in a models folder (".safetensors" may be given or not)."""
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    bad = sorted({c for c in name if c in '/\\:*?"<>|' or ord(c) < 32})
    if not name or name.startswith(".") or ".." in name or bad:
        shown = f" (it contains {' '.join(repr(c) for c in bad)})" if bad else ""
        raise InputError(f"concept name {name!r} cannot be a file name{shown}; use letters, digits, '_' and '-', "
                         "not starting with a dot, e.g. my_mug.")
    return name


def save_concept(concept: Concept, lora_path, embedding_path) -> None:
    """Write both files atomically (metadata in both headers, so either file identifies the concept).

    The LoRA goes first: the embedding is what marks a saved concept, so it appears only once both exist.
    """
    meta = {METADATA_KEY: json.dumps(concept.metadata(), sort_keys=True)}
    if concept.lora:
        save_safetensors(concept.lora, lora_path, metadata=meta)
    save_safetensors(concept.embedding_tensors(), embedding_path, metadata=meta)


def read_concept_metadata(path) -> dict | None:
    """ProtoBooth's metadata from a safetensors header (tensors are not read); None for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    try:
        return json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except json.JSONDecodeError:
        return None


def _read(path, what: str):
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise InputError(f"{what} {path} is not a readable safetensors file ({error}).") from None


def load_concept(embedding_path, lora_path=None) -> Concept:
    """Read a concept back from its embedding file (and its LoRA file, when there is one)."""
    tensors, header = _read(embedding_path, "embedding")
    if METADATA_KEY not in header:
        raise InputError(f"{embedding_path} has no ProtoBooth metadata; it is not a concept saved by ProtoBooth.")
    meta = json.loads(header[METADATA_KEY])
    rows = tensors[EMBEDDING_KEYS.get(meta["family"], next(iter(tensors)))]
    objects = [ConceptObject(o["token"], o["class_word"], rows[o["rows"][0] : o["rows"][1]].clone()) for o in meta["objects"]]
    lora = _read(lora_path, "LoRA")[0] if lora_path is not None else {}
    return Concept(objects, lora, meta["family"], meta["base_fingerprint"], meta.get("settings", {}), meta.get("version", "?"))


@contextlib.contextmanager
def concept_applied(pipeline, concept: Concept, lora_scale: float = 1.0):
    """Apply a concept to a diffusers pipeline with the stock loaders; undone when the block ends.

    Tokens go in through load_textual_inversion (one call per object, `tok`, `tok_1`, …), the LoRA
    through load_lora_weights — exactly what a diffusers user without ProtoBooth would do.
    """
    for obj in concept.objects:
        pipeline.load_textual_inversion({obj.token: obj.vectors.to(pipeline.text_encoder.dtype)}, token=obj.token)
    if concept.lora:
        pipeline.load_lora_weights(dict(concept.lora), adapter_name="protobooth")
        pipeline.set_adapters(["protobooth"], adapter_weights=[lora_scale])
    try:
        yield pipeline
    finally:
        if concept.lora:
            pipeline.unload_lora_weights()
        pipeline.unload_textual_inversion()

