"""The Concept: what one-shot training produces, and its two files that stock tools load.

- LoRA file: kohya keys (`lora_unet_<diffusers module path with _>.lora_down.weight`/`.lora_up.weight`
  plus an `.alpha` tensor), loaded by ComfyUI's LoraLoader (old and new) and diffusers' load_lora_weights.
- Embedding file: `{"clip_l": [n, dim]}` (SD2: `clip_h`; SDXL: `clip_l` [n, 768] and `clip_g` [n, 1280], the halves
  of its joint token vectors), every object's vectors one row each, in object order; the header metadata records which rows belong to which token, the class words, the base model's
  fingerprint and family, the training settings and the software version. ComfyUI reads it through
  `embedding:<name>`, diffusers through load_textual_inversion.
- Per-object embedding files, only for concepts of several objects: `<name>_<token>.safetensors` beside the
  embedding file, holding that object's rows alone, since `embedding:<name>` gives one word spanning every
  object's rows. Their header names the concept they belong to (not as a concept of their own, so
  concept lists leave them out).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..fileio import save_safetensors
from ..models.families import FAMILIES, TRAINABLE
from ..version import __version__

log = logging.getLogger("protobooth")

METADATA_KEY = "protobooth"
PART_KEY = "protobooth_object"  # header key of a per-object embedding file
EXTENSION = ".safetensors"
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
    inputs_hash: str | None = None  # what it was made from, when a batch made it (its skip-if-done test)
    # The widths of a vector's parts, one per text encoder (SDXL: CLIP-L's, bigG's); () means one part.
    text_widths: tuple[int, ...] = ()

    @property
    def tokens(self) -> list[str]:
        return [o.token for o in self.objects]

    def metadata(self) -> dict:
        rows, start = [], 0
        for obj in self.objects:
            rows.append({"token": obj.token, "class_word": obj.class_word, "rows": [start, start + obj.vectors.shape[0]]})
            start += obj.vectors.shape[0]
        meta = {
            "objects": rows,
            "lora": bool(self.lora),  # so a missing LoRA file is noticed on loading
            "family": self.family,
            "base_fingerprint": self.base_fingerprint,
            "settings": self.settings,
            "version": self.version,
        }
        return meta if self.inputs_hash is None else {**meta, "inputs_hash": self.inputs_hash}

    def embedding_tensors(self, vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The embedding file's tensors for `vectors` (default: every object's rows), one per text encoder."""
        rows = torch.cat([o.vectors for o in self.objects]) if vectors is None else vectors
        rows = rows.detach().float().cpu()
        keys = FAMILIES[self.family].embedding_keys
        widths = self.text_widths or (rows.shape[1],)
        if len(widths) != len(keys) or sum(widths) != rows.shape[1]:
            raise ValueError(f"{self.family} vectors {rows.shape[1]} wide cannot be split as {widths} for {keys}")
        return {key: part.contiguous() for key, part in zip(keys, rows.split(list(widths), dim=1))}


def peft_to_kohya(peft_state: dict[str, torch.Tensor], alpha: float, prefix: str = LORA_PREFIX) -> dict[str, torch.Tensor]:
    """A LoRA from peft (`<module>.lora_A.weight`/`lora_B`) → kohya keys (`<prefix><module with _>.lora_down/up`,
    with alpha tensors); the prefix says which model it patches (lora_unet_, lora_te_text_model_)."""
    kohya = {}
    for key, value in peft_state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value.detach().float().cpu()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return dict(sorted(kohya.items()))


MAX_NAME_BYTES = 160  # leaves room for "_<token>" and ".safetensors" within a file system's 255


def check_concept_name(name: str) -> str:
    """A concept name that is safe as a file name in a models folder (".safetensors" may be given or not)."""
    name = name.strip()
    if name.endswith(EXTENSION):
        name = name[: -len(EXTENSION)]
    bad = sorted({c for c in name if c in '/\\:*?"<>|' or ord(c) < 32})
    if not name or name.startswith(".") or ".." in name or bad:
        shown = f" (it contains {' '.join(repr(c) for c in bad)})" if bad else ""
        raise InputError(f"concept name {name!r} cannot be a file name{shown}; use letters, digits, '_' and '-', "
                         "not starting with a dot, e.g. my_mug.")
    if any(c.isspace() for c in name):
        # `embedding:<name>` in a prompt ends at the first space, so the stock loaders could not find it.
        raise InputError(f"concept name {name!r} contains a space, which `embedding:{name}` in a prompt cannot "
                         f"hold; use '_' instead, e.g. {'_'.join(name.split())}.")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InputError(f"concept name {name[:40]!r}... is {len(name.encode('utf-8'))} bytes; file names allow 255 with "
                         f"the per-object and extension parts, so use at most {MAX_NAME_BYTES}.")
    return name


def _stem(path: Path) -> str:
    return path.name[: -len(EXTENSION)] if path.name.endswith(EXTENSION) else path.stem


def object_embedding_paths(embedding_path, tokens: list[str]) -> dict[str, Path]:
    """token → its own embedding file `<name>_<token>.safetensors` beside `embedding_path`; none for one object.

    '<' and '>' (allowed in tokens, not in file names) are left out of the file name.
    """
    if len(tokens) < 2:
        return {}
    path = Path(embedding_path)
    paths = {}
    for token in tokens:
        part = check_concept_name(f"{_stem(path)}_{token.replace('<', '').replace('>', '')}")
        paths[token] = path.with_name(part + EXTENSION)
    if len(set(paths.values())) < len(paths):
        raise InputError(f"tokens {', '.join(tokens)} give the same per-object file name once '<' and '>' are left "
                         "out; rename one of them.")
    return paths


def models_folder_paths(folder: Path, name: str) -> tuple[Path, Path]:
    """(LoRA file, embedding file) of a concept named `name` in a ComfyUI-style models folder (loras/, embeddings/)."""
    return Path(folder) / "loras" / f"{name}{EXTENSION}", Path(folder) / "embeddings" / f"{name}{EXTENSION}"


def concept_files(lora_path, embedding_path, tokens: list[str]) -> list[Path]:
    """Every file save_concept may write for a concept with these tokens (what "already exists" must check)."""
    return [Path(lora_path), Path(embedding_path), *object_embedding_paths(embedding_path, tokens).values()]


def save_concept(concept: Concept, lora_path, embedding_path) -> None:
    """Write the concept's files atomically (metadata in the LoRA's and embedding's headers, so either
    identifies the concept), replacing what an earlier concept of the same name left there.

    The embedding goes last: it is what marks a saved concept, so a concept is listed only once complete.
    """
    lora_path, embedding_path = Path(lora_path), Path(embedding_path)
    parts = object_embedding_paths(embedding_path, concept.tokens)
    for path in parts.values():
        if read_concept_metadata(path) is not None:
            raise InputError(f"{path} is another saved concept, and this concept's file for one of its objects would "
                             f"replace it; save this concept under another name than {_stem(embedding_path)!r}.")
    meta = {METADATA_KEY: json.dumps(concept.metadata(), sort_keys=True)}
    if concept.lora:
        save_safetensors(concept.lora, lora_path, metadata=meta)
    elif lora_path.exists():
        # Left by an earlier concept of this name: loading this one would pick it up.
        lora_path.unlink()
    for obj in concept.objects:
        if obj.token in parts:
            part = {"concept": _stem(embedding_path), "token": obj.token, "class_word": obj.class_word,
                    "family": concept.family, "base_fingerprint": concept.base_fingerprint}
            save_safetensors(concept.embedding_tensors(obj.vectors), parts[obj.token],
                             metadata={PART_KEY: json.dumps(part, sort_keys=True)})
    _remove_stale_parts(embedding_path, set(parts.values()))
    save_safetensors(concept.embedding_tensors(), embedding_path, metadata=meta)


def _remove_stale_parts(embedding_path: Path, keep: set[Path]) -> None:
    """Delete per-object files that an earlier concept of this name wrote for objects this one lacks."""
    import glob

    name = _stem(embedding_path)
    for path in embedding_path.parent.glob(f"{glob.escape(name)}_*{EXTENSION}"):
        if path not in keep and (read_concept_metadata(path, PART_KEY) or {}).get("concept") == name:
            path.unlink()


def read_concept_metadata(path, key: str = METADATA_KEY) -> dict | None:
    """ProtoBooth's metadata from a safetensors header (tensors are not read); None for any other file.

    key=PART_KEY reads a per-object embedding file's header instead.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    try:
        return json.loads(header[key]) if key in header else None
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


def _header_metadata(header: dict) -> dict | None:
    try:
        meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    except json.JSONDecodeError:
        meta = None
    return meta if isinstance(meta, dict) else None


def load_concept(embedding_path, lora_path=None) -> Concept:
    """Read a concept back from its embedding file (and its LoRA file, when it has one), checking that they
    make one whole concept: a family this version knows, every object's rows in the file, the LoRA's header
    naming the same concept."""
    tensors, header = _read(embedding_path, "embedding")
    meta = _header_metadata(header)
    if meta is None:
        part = read_concept_metadata(embedding_path, PART_KEY)
        if part:
            raise InputError(f"{embedding_path} holds one object ({part.get('token')}) of concept "
                             f"{part.get('concept')!r}, for stock embedding: prompts; load the concept itself.")
        raise InputError(f"{embedding_path} has no ProtoBooth metadata; it is not a concept saved by ProtoBooth.")
    family = meta.get("family")
    if family not in TRAINABLE:
        raise InputError(f"{embedding_path} is a concept for model family {family!r}, which this version of ProtoBooth "
                         f"cannot use (it knows {', '.join(TRAINABLE)}); update ProtoBooth or train it again.")
    halves = []
    for key in FAMILIES[family].embedding_keys:
        half = tensors.get(key)
        if half is None or half.ndim != 2:
            raise InputError(f"{embedding_path} has no [rows, width] {key!r} tensor, which an {family} concept keeps its "
                             "vectors in; the file is damaged or incomplete: save the concept again.")
        if halves and half.shape[0] != halves[0].shape[0]:
            raise InputError(f"{embedding_path}: its {key!r} tensor has {half.shape[0]} row(s) but the other half "
                             f"{halves[0].shape[0]}; the file is damaged: save the concept again.")
        halves.append(half)
    rows = torch.cat(halves, dim=1)
    widths = tuple(half.shape[1] for half in halves) if len(halves) > 1 else ()
    objects = []
    for entry in meta.get("objects") or []:
        token, span = entry.get("token"), entry.get("rows")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) for i in span)
                and 0 <= span[0] < span[1] <= rows.shape[0]):
            raise InputError(f"{embedding_path}: object {token!r} names rows {span} but the file holds {rows.shape[0]} "
                             "row(s); the file is damaged: save the concept again.")
        objects.append(ConceptObject(token, entry.get("class_word"), rows[span[0] : span[1]].clone()))
    if not objects:
        raise InputError(f"{embedding_path} names no objects; the file is damaged: save the concept again.")
    lora = {}
    if lora_path is not None:
        lora, lora_header = _read(lora_path, "LoRA")
        if _header_metadata(lora_header) != meta:
            raise InputError(f"LoRA {lora_path} does not belong to the concept in {embedding_path} (its header names "
                             "another concept or none); remove or rename that LoRA, or save the concept again.")
    elif meta.get("lora"):
        raise InputError(f"{embedding_path} was saved with a LoRA, but its LoRA file is missing: put "
                         f"{_stem(Path(embedding_path))}{EXTENSION} back in the loras folder, or give its path.")
    return Concept(objects, lora, family, meta.get("base_fingerprint", "unknown"), meta.get("settings", {}),
                   meta.get("version", "?"), meta.get("inputs_hash"), widths)


@contextlib.contextmanager
def concept_applied(pipeline, concept: Concept, lora_scale: float = 1.0):
    """Apply a concept to a diffusers pipeline with the stock loaders; undone when the block ends.

    Tokens go in through load_textual_inversion (one call per object, `tok`, `tok_1`, …; for SDXL one per object
    and text encoder, each with its half), the LoRA through load_lora_weights — exactly what a diffusers user
    without ProtoBooth would do. The words go into copies of the tokenizers, and the undo puts the originals and
    the encoders' own token tables back (diffusers' unload_textual_inversion cannot undo it with transformers 4's
    fast tokenizers).
    """
    parts = [("tokenizer", pipeline.text_encoder)]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        parts.append(("tokenizer_2", pipeline.text_encoder_2))
    originals = [(name, getattr(pipeline, name), encoder, encoder.get_input_embeddings(), encoder.config.vocab_size)
                 for name, encoder in parts]
    try:
        for name, _ in parts:
            setattr(pipeline, name, copy.deepcopy(getattr(pipeline, name)))
        for obj in concept.objects:
            for (name, encoder), half in zip(parts, concept.embedding_tensors(obj.vectors).values()):
                pipeline.load_textual_inversion({obj.token: half.to(encoder.dtype)}, token=obj.token,
                                                tokenizer=getattr(pipeline, name), text_encoder=encoder)
        if concept.lora:
            pipeline.load_lora_weights(dict(concept.lora), adapter_name="protobooth")
            pipeline.set_adapters(["protobooth"], adapter_weights=[lora_scale])
        yield pipeline
    finally:
        if concept.lora:
            pipeline.unload_lora_weights()
        for name, tokenizer, encoder, table, vocab_size in originals:
            setattr(pipeline, name, tokenizer)
            encoder.set_input_embeddings(table)
            encoder.config.vocab_size = vocab_size

