"""The batch manifest: one JSON object per line, one concept per line, checked whole before anything runs.

    {"defaults": {"method": "object-driven", "settings": {"steps": 300}}}      <- optional first line
    {"image": "mug.jpg", "token": "zqmug", "class": "mug", "mask": "mug-mask.png"}
    {"image": "pair.jpg", "name": "pair", "objects": [{"token": "zqa", "class": "cup", "box": [10, 20, 200, 220]},
                                                      {"token": "zqb", "class": "vase", "points": [[300, 90]]}]}

A line names its objects either at the top level (one object: token, class and mask, box or points) or as a list
under "objects". Paths are relative to the manifest's folder. "defaults" fills every key a line leaves out
("settings" merges key by key). Every bad line is reported, each with its line number, in one error.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

LINE_KEYS = {"image", "name", "method", "settings", "objects", "token", "class", "mask", "box", "points"}
OBJECT_KEYS = {"token", "class", "mask", "box", "points"}


@dataclass
class BatchObject:
    token: str
    class_word: str
    mask: Path | None = None
    box: list[float] | None = None
    points: list[list[float]] = field(default_factory=list)


@dataclass
class BatchItem:
    """One concept to learn: everything a worker needs, as plain data (it travels to Ray workers)."""

    line: int
    name: str
    image: Path
    objects: list[BatchObject]
    method: str
    settings: dict
    inputs_hash: str = ""  # of the photo, masks, objects, method, settings and base model: same hash, same concept

    @property
    def tokens(self) -> list[str]:
        return [o.token for o in self.objects]

    @property
    def class_words(self) -> list[str]:
        return [o.class_word for o in self.objects]

    @property
    def needs_sam(self) -> bool:
        return any(o.mask is None for o in self.objects)


def read_manifest(path, model_identity: str, has_sam: bool) -> list[BatchItem]:
    """Every concept of the manifest at `path`, checked; an InputError lists every bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} not found; give a .jsonl file with one concept per line.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"manifest {path} cannot be read as UTF-8 text ({error}).") from None
    defaults: dict = {}
    items, problems = [], []
    for number, text in enumerate(lines, 1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict):
                raise InputError("a line must be a JSON object ({...}).")
            if "defaults" in entry:
                if items or set(entry) != {"defaults"} or not isinstance(entry["defaults"], dict):
                    raise InputError('a {"defaults": {...}} line must come before the concepts and hold nothing else.')
                defaults = entry["defaults"]
                _check_keys(defaults, LINE_KEYS - {"name", "image"}, "defaults")
                continue
            items.append(_item(number, _with_defaults(entry, defaults), path.parent, has_sam))
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not JSON ({error.msg} at column {error.colno}).")
        except InputError as error:
            problems.append(f"line {number}: {error}")
    if not items and not problems:
        raise InputError(f"manifest {path} names no concept; write one JSON object per line (see protobooth batch --help).")
    problems += _across_lines(items)
    if problems:
        raise InputError(f"manifest {path} has {len(problems)} problem(s); nothing was trained:\n  " + "\n  ".join(problems))
    for item in items:
        item.inputs_hash = inputs_hash(item, model_identity)
    return items


def _with_defaults(entry: dict, defaults: dict) -> dict:
    merged = {**defaults, **entry}
    if isinstance(defaults.get("settings"), dict) and isinstance(entry.get("settings"), dict):
        merged["settings"] = {**defaults["settings"], **entry["settings"]}
    return merged


def _check_keys(entry: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; keys are {', '.join(sorted(allowed))}.")


def _item(number: int, entry: dict, folder: Path, has_sam: bool) -> BatchItem:
    from ..concept.concept import check_concept_name
    from ..images import check_image_file
    from ..segment import ObjectPrompt
    from ..text.tokenizer import clip_tokenizer
    from ..text.vocabulary import check_objects
    from ..train import TrainSettings

    _check_keys(entry, LINE_KEYS, "the line")
    if "image" not in entry:
        raise InputError('no "image": give the photo\'s path.')
    image = folder / str(entry["image"])
    size = check_image_file(image, "image")
    if "objects" in entry:
        if OBJECT_KEYS & set(entry):
            raise InputError('give the objects either at the top level or under "objects", not both.')
        raw = entry["objects"]
        if not isinstance(raw, list) or not raw or not all(isinstance(o, dict) for o in raw):
            raise InputError('"objects" must be a list of {"token", "class", "mask"|"box"|"points"} objects.')
    else:
        raw = [{k: entry[k] for k in OBJECT_KEYS if k in entry}]
    objects = []
    for index, spec in enumerate(raw, 1):
        label = f"object {index}" if len(raw) > 1 else "the object"
        _check_keys(spec, OBJECT_KEYS, label)
        if "token" not in spec or "class" not in spec:
            raise InputError(f'{label} needs a "token" (a made-up trigger word) and a "class" (its class word).')
        if "mask" in spec:
            if "box" in spec or "points" in spec:
                raise InputError(f'{label}: give a "mask", or a "box"/"points" for SAM, not both.')
            mask = folder / str(spec["mask"])
            mask_size = check_image_file(mask, f"{label}'s mask")
            if mask_size != size:
                raise InputError(f"{label}'s mask {mask} is {mask_size[0]}x{mask_size[1]} but the image is "
                                 f"{size[0]}x{size[1]}; make the mask from this image (same size).")
            objects.append(BatchObject(str(spec["token"]), str(spec["class"]), mask=mask))
        elif "box" in spec or "points" in spec:
            if not has_sam:
                raise InputError(f'{label} has a "box"/"points", which need --sam (a segment-anything checkpoint).')
            prompt = ObjectPrompt(box=spec.get("box"), points=spec.get("points") or []).check(label, size)
            objects.append(BatchObject(str(spec["token"]), str(spec["class"]), box=list(prompt.box) if prompt.box else None,
                                       points=[list(p) for p in prompt.points]))
        else:
            raise InputError(f'{label} needs a "mask" file, or a "box"/"points" for SAM.')
    tokens, class_words = check_objects(clip_tokenizer(), [o.token for o in objects], [o.class_word for o in objects])
    for obj, token, class_word in zip(objects, tokens, class_words):
        obj.token, obj.class_word = token, class_word
    name = check_concept_name(str(entry.get("name", tokens[0])))
    settings = entry.get("settings", {})
    if not isinstance(settings, dict):
        raise InputError('"settings" must be an object of setting names and values, e.g. {"steps": 300}.')
    method = entry.get("method")
    built = TrainSettings.from_values(method, **settings)  # unknown method or setting: an InputError naming it
    built.check()
    return BatchItem(number, name, image, objects, built.method_name, settings)


def _across_lines(items: list[BatchItem]) -> list[str]:
    """What no single line shows: two concepts with one name, one token learned from two photos."""
    problems, names, photos = [], {}, {}
    for item in items:
        if item.name in names:
            problems.append(f"line {item.line}: concept name {item.name!r} is also line {names[item.name]}'s; give one "
                            'of them another "name" (both would write the same files).')
        names.setdefault(item.name, item.line)
        for token in item.tokens:
            first = photos.setdefault(token, (item.image.resolve(), item.line))
            if first[0] != item.image.resolve():
                problems.append(f"line {item.line}: token {token!r} is learned from {item.image} here and from another "
                                f"photo on line {first[1]}; one trigger word cannot mean two objects: rename one.")
    return problems


def inputs_hash(item: BatchItem, model_identity: str) -> str:
    """A digest of everything that decides the trained concept (file contents, not paths, for the photo and masks)."""
    digest = hashlib.sha256()
    for path in [item.image, *(o.mask for o in item.objects if o.mask is not None)]:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    described = {"objects": [{"token": o.token, "class": o.class_word, "box": o.box, "points": o.points} for o in item.objects],
                 "method": item.method, "settings": item.settings, "model": model_identity}
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:32]
