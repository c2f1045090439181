"""What the user says about each object: a box and/or points in image pixels, from JSON, a dict or the CLI."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError


@dataclass
class ObjectPrompt:
    """What SAM is told about one object: a box and/or points, in image pixels.

    box: (x0, y0, x1, y1), left-top and right-bottom corners, or None.
    points: (x, y) clicks; labels: one per point, 1 = on the object, 0 = background (None: all 1).
    """

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] | None = None

    def check(self, label: str = "object", image_size: tuple[int, int] | None = None) -> "ObjectPrompt":
        """Validate and return a normalised copy (float coordinates, labels filled in).

        `label` names the object in error messages; with `image_size` (width, height) the box and the
        points must also lie inside the image.
        """
        box = None
        if self.box is not None:
            box = tuple(_numbers(self.box, 4, f"{label}: box"))
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                raise InputError(
                    f"{label}: box {_fmt(box)} is inverted or empty; give it as [left, top, right, bottom] "
                    "with right > left and bottom > top."
                )
        if not isinstance(self.points, (list, tuple)):
            raise InputError(f"{label}: points must be a list of [x, y] pairs.")
        points = [tuple(_numbers(p, 2, f"{label}: point {i + 1}")) for i, p in enumerate(self.points)]
        labels = [1] * len(points) if self.labels is None else list(self.labels)
        if box is None and not points:
            raise InputError(f"{label}: no box and no point; give a box around the object or click a point on it.")
        if len(labels) != len(points):
            raise InputError(
                f"{label}: {len(points)} points but {len(labels)} labels; give one label per point "
                "(1 = on the object, 0 = background)."
            )
        for i, value in enumerate(labels):
            if isinstance(value, bool) or value not in (0, 1):
                raise InputError(f"{label}: label {i + 1} is {value!r}; use 1 (on the object) or 0 (background).")
        if image_size is not None:
            width, height = image_size
            if box is not None and not (0 <= box[0] and 0 <= box[1] and box[2] <= width and box[3] <= height):
                raise InputError(
                    f"{label}: box {_fmt(box)} reaches outside the {width}x{height} image; "
                    f"keep it within 0..{width} (x) and 0..{height} (y)."
                )
            for i, (x, y) in enumerate(points):
                if not (0 <= x <= width and 0 <= y <= height):
                    raise InputError(
                        f"{label}: point {i + 1} ({_fmt((x, y))}) is outside the {width}x{height} image; "
                        f"keep x within 0..{width} and y within 0..{height}."
                    )
        return ObjectPrompt(box=box, points=points, labels=[int(v) for v in labels])


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _numbers(values, count: int, what: str) -> list[float]:
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = values.tolist()
    if (
        not isinstance(values, (list, tuple))
        or len(values) != count
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise InputError(f"{what} must be {count} finite numbers, got {values!r}.")
    return [float(v) for v in values]


_PROMPT_KEYS = ("box", "points", "labels", "positive", "negative")


def parse_prompts(prompts, image_size: tuple[int, int] | None = None) -> list[ObjectPrompt]:
    """Object prompts from JSON text, parsed JSON, or ObjectPrompts; validated, in object order.

    The JSON is a list with one entry per object (a single entry may be given without the list):

        [{"box": [x0, y0, x1, y1]},
         {"points": [[x, y], [x, y]], "labels": [1, 0]},
         {"positive": [[x, y]], "negative": [[x, y]]},
         {"box": [x0, y0, x1, y1], "negative": [[x, y]]}]

    Coordinates are image pixels, x to the right and y down from the top-left corner. An entry may
    hold a "box" (left, top, right, bottom), "points" with optional "labels" (1 = on the object,
    0 = background; all 1 when absent), and "positive" / "negative" point lists, in any combination
    with at least a box or a point. A point is [x, y] or {"x": x, "y": y}. Errors name the entry as
    `prompts[i].key` (i counts from 0) and the object as "object i+1". With `image_size` (width,
    height), boxes and points must also lie inside the image.
    """
    if isinstance(prompts, str):
        if not prompts.strip():
            raise InputError("prompts are empty; give one entry per object, e.g. [{\"box\": [10, 10, 200, 150]}].")
        try:
            prompts = json.loads(prompts)
        except json.JSONDecodeError as error:
            raise InputError(
                f"prompts are not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                'write them like [{"box": [10, 10, 200, 150]}, {"positive": [[80, 90]]}].'
            ) from None
    if isinstance(prompts, (dict, ObjectPrompt)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list with one entry per object, got {type(prompts).__name__}.")
    if not prompts:
        raise InputError("the prompts list is empty; give one entry per object, e.g. [{\"box\": [10, 10, 200, 150]}].")
    return [_parse_entry(entry, index, image_size) for index, entry in enumerate(prompts)]


def _parse_entry(entry, index: int, image_size) -> ObjectPrompt:
    where = f"prompts[{index}]"
    label = f"{where} (object {index + 1})"
    if isinstance(entry, ObjectPrompt):
        return entry.check(label, image_size)
    if not isinstance(entry, dict):
        raise InputError(f"{label} must be an object like {{\"box\": [x0, y0, x1, y1]}}, got {entry!r}.")
    unknown = sorted(set(entry) - set(_PROMPT_KEYS))
    if unknown:
        raise InputError(f"{label} has unknown key(s) {unknown}; use {', '.join(_PROMPT_KEYS)}.")
    points, labels = [], []
    for key in ("points", "positive", "negative"):
        values = entry.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)):
            raise InputError(f"{where}.{key} must be a list of [x, y] points, got {values!r}.")
        points += [_point(point, f"{where}.{key}[{i}]") for i, point in enumerate(values)]
        if key == "points":
            given = entry.get("labels")
            if given is not None and (not isinstance(given, (list, tuple)) or len(given) != len(values)):
                raise InputError(
                    f"{where}.labels must hold one label per entry of {where}.points ({len(values)}), got {given!r}; "
                    "use 1 for a point on the object, 0 for background."
                )
            labels += [1] * len(values) if given is None else list(given)
        else:
            labels += [1 if key == "positive" else 0] * len(values)
    if entry.get("labels") is not None and entry.get("points") is None:
        raise InputError(f"{where}.labels is given without {where}.points; put the points they label in \"points\".")
    return ObjectPrompt(box=entry.get("box"), points=points, labels=labels).check(label, image_size)


def _point(value, where: str):
    if isinstance(value, dict) and set(value) >= {"x", "y"}:
        value = [value["x"], value["y"]]
    return tuple(_numbers(value, 2, where))
