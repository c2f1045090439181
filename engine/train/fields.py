"""Settings fields described for people: each field's help, range, label and widget facts live in its metadata.

That metadata is the one place a setting is described: the checks below, the CLI's flags and the ComfyUI nodes'
widgets (options.py) are all made from it, so a new field appears everywhere at once. A setting has one name,
the field's; old CLI spellings stay as aliases of its flag.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from ..errors import InputError


def setting(default, help: str, *, label: str | None = None, low=None, above=None, high=None, choices=None,
            aliases: tuple[str, ...] = (), widget: dict | None = None, from_widget=None):
    """A dataclass field described for people: `help` (one line), the inclusive `low`/`high` or exclusive `above`
    bound, `choices`, a `label` for messages (default: the name with spaces), old CLI flag `aliases`, and for the
    ComfyUI widget `widget` options that differ from the setting's own and `from_widget` (widget value → value)."""
    metadata = {"help": help, "label": label, "low": low, "above": above, "high": high, "choices": choices,
                "aliases": aliases, "widget": widget or {}, "from_widget": from_widget}
    if isinstance(default, (list, dict)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata=metadata)


def label(item: dataclasses.Field) -> str:
    return item.metadata.get("label") or item.name.replace("_", " ")


def described(settings_class) -> list[dataclasses.Field]:
    """The fields of a settings class that carry a description (every field but the method)."""
    return [f for f in dataclasses.fields(settings_class) if "help" in f.metadata]


def check_fields(settings) -> None:
    """Each field's type, finiteness, bounds and choices, as its metadata says; the message names the setting."""
    for item in described(settings):
        value, meta, name = getattr(settings, item.name), item.metadata, label(item)
        if value is None and item.default is None:
            continue
        kind = type(item.default) if item.default is not None else (float if "float" in str(item.type) else int)
        if kind is bool:
            if not isinstance(value, bool):
                raise InputError(f"{name} must be true or false (got {value!r}).")
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise InputError(f"{name} must be a whole number (got {value!r}).")
        if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)):
            raise InputError(f"{name} must be a finite number (got {value!r}).")
        if meta["choices"] is not None and value not in meta["choices"]:
            raise InputError(f"{name} must be one of {', '.join(map(str, meta['choices']))} (got {value!r}).")
        unset = " or unset" if item.default is None else ""
        if meta["low"] is not None and value < meta["low"]:
            bound = "must not be negative" if meta["low"] == 0 and kind is float else f"must be at least {meta['low']}"
            raise InputError(f"{name} {bound}{unset} (got {value}).")
        if meta["above"] is not None and value <= meta["above"]:
            raise InputError(f"{name} must be above {meta['above']}{unset} (got {value}).")
        if meta["high"] is not None and value > meta["high"]:
            raise InputError(f"{name} must be at most {meta['high']} (got {value}).")


@dataclass
class MethodSettings:
    """A method's own settings (a dataclass of `setting` fields); the registry knows which method they belong to."""

    def check(self, shared) -> None:
        """Rules between settings (on top of each field's own), `shared` being the TrainSettings; none by default."""
