"""The methods registry: every way ProtoBooth learns a concept, by name.

A method is one file here holding a Method subclass and its MethodSettings, plus one line in METHODS below. The
CLI (`--method`), the library (TrainSettings(method=...)) and the ComfyUI nodes (one Train node per method) all read
this registry. Methods from other packages join through the "protobooth.methods" entry-point group (each entry
point names a Method subclass).
"""
from __future__ import annotations

import functools
import importlib.metadata

from ...errors import InputError
from .attribute import Attribute
from .base import Method
from .object_driven import ObjectDriven
from .textboost import TextBoost

METHODS: tuple[type[Method], ...] = (ObjectDriven, TextBoost, Attribute)
ENTRY_POINT_GROUP = "protobooth.methods"


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, type[Method]]:
    """Every method by name: the built-in ones, then those of installed plugins."""
    found = {method.name: method for method in METHODS}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        method = entry.load()
        if not (isinstance(method, type) and issubclass(method, Method)) or method.name in found:
            raise TypeError(f"entry point {entry.value} in {ENTRY_POINT_GROUP} is not a new Method subclass")
        found[method.name] = method
    return found


def default_method() -> type[Method]:
    return ObjectDriven


def method_of(settings) -> type[Method]:
    """The method whose settings class `settings` is an instance of."""
    for method in registry().values():
        if type(settings) is method.settings_class:
            return method
    raise InputError(f"{type(settings).__name__} belongs to no registered method; give the settings of one of "
                     f"{', '.join(registry())}.")


def method_class(name: str) -> type[Method]:
    """The method of that name; an InputError lists the known ones."""
    methods = registry()
    if name not in methods:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(methods)}.")
    return methods[name]


def strength_warning(concept, strength: float) -> str | None:
    """What to tell a user who applies `concept` at LoRA strength `strength`, when its method knows that overshoots."""
    name = (concept.settings.get("method") or {}).get("name")
    method = registry().get(name)
    limit = method.sensible_strength if method else None
    if limit is None or abs(strength) <= limit:
        return None
    return (f"strength {strength} is beyond {limit} for a {method.label} concept ({'/'.join(concept.tokens)}): the "
            "learned attribute overshoots; 0 to 1.25 is the usual range.")
