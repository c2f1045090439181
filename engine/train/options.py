"""Settings as people reach them: the CLI's flags and the ComfyUI nodes' widgets, both made from the fields'
metadata (settings.py), so neither restates a default, a range or a help text.

CLI: `--method` and one flag per setting, `--<name-with-dashes>` (old spellings as aliases), booleans as
`--x/--no-x`; a flag that belongs to another method than the chosen one is refused. Nodes: a method lists the
settings its node shows (Method.widgets); each becomes a widget with the setting's default, range and help as its
tooltip. Nothing here imports ComfyUI: the nodes turn these specs into their INPUT_TYPES.
"""
from __future__ import annotations

import argparse

from ..errors import InputError
from .methods import default_method, method_class, registry
from .fields import described
from .settings import TrainSettings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(item):
    if item.default is not None:
        return type(item.default)
    return float if "float" in str(item.type) else int


def _shown(default) -> str:
    return "unset" if default is None else "; ".join(default) if isinstance(default, tuple) else str(default)


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """--method, then a group of flags for the shared settings and one per method."""
    methods = registry()
    parser.add_argument("--method", choices=list(methods), default=default_method().name,
                        help="how the concept is learned: " + "; ".join(f"{m.name}: {m.label}" for m in methods.values()))
    owners = [("training", TrainSettings)] + [(f"{m.name} method", m.settings_class) for m in methods.values()]
    method_defaults: dict[str, dict[str, object]] = {}  # a method setting → its default in each method that has it
    for m in methods.values():
        for item in described(m.settings_class):
            method_defaults.setdefault(item.name, {})[m.name] = item.default
    taken = set()
    for title, owner in owners:
        group = parser.add_argument_group(f"{title} settings")
        for item in described(owner):
            if item.name in taken:  # a setting two methods both have gets one flag
                continue
            taken.add(item.name)
            meta = item.metadata
            shown = _shown(item.default) + "".join(f"; {m.name}: {_shown(m.shared_defaults[item.name])}"
                                                   for m in methods.values() if item.name in m.shared_defaults)
            per_method = method_defaults.get(item.name, {})
            if len(per_method) > 1 and len(set(map(repr, per_method.values()))) > 1:
                shown = "; ".join(f"{name}: {_shown(default)}" for name, default in per_method.items())
            options = dict(dest=item.name, default=argparse.SUPPRESS, help=f"{meta['help']} (default: {shown})")
            kind = _value_type(item)
            negatives = [a for a in meta["aliases"] if a.startswith("--no-")]
            if kind is bool:
                group.add_argument(_flag(item.name), action=argparse.BooleanOptionalAction, **options)
                for alias in negatives:
                    group.add_argument(alias, dest=item.name, action="store_false", default=argparse.SUPPRESS,
                                       help=f"the same as --no-{item.name.replace('_', '-')}")
                continue
            if kind is tuple:
                options.update(action="append", type=str, metavar=item.name.upper().rstrip("S"))
            else:
                options.update(type=kind, choices=meta["choices"])
            group.add_argument(_flag(item.name), *meta["aliases"], **options)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The TrainSettings the flags ask for; a flag of another method than --method is an InputError."""
    method = method_class(args.method)
    own = {item.name for owner in (TrainSettings, method.settings_class) for item in described(owner)}
    every = {item.name for owner in (TrainSettings, *(m.settings_class for m in registry().values()))
             for item in described(owner)}
    given = {name: value for name, value in vars(args).items() if name in every}  # unset flags are absent
    foreign = sorted(set(given) - own)
    if foreign:
        raise InputError(f"{', '.join(_flag(name) for name in foreign)} belong(s) to another method than "
                         f"--method {method.name}; leave them out or choose that method.")
    if "templates" in given:
        given["templates"] = tuple(given["templates"])
    return TrainSettings.from_values(method.name, **given)


def _field(method, name: str):
    for owner in (TrainSettings, method.settings_class):
        for item in described(owner):
            if item.name == name:
                return item
    raise KeyError(f"{method.name} lists widget {name!r}, which is none of its settings")


# Every Train node's optional inputs (memory switches): optional, so that workflows saved before them still validate.
OPTIONAL_WIDGETS = ("gradient_checkpointing", "offload_frozen", "recompose", "recompose_resize",
                    "recompose_copies", "recompose_companions")


def widget_specs(method, names=None) -> dict[str, tuple]:
    """The method's node widgets (or the settings `names`): name → (ComfyUI input type, options), in that order."""
    specs = {}
    for name in method.widgets if names is None else names:
        item = _field(method, name)
        meta, kind = item.metadata, _value_type(item)
        default = method.shared_defaults.get(name, item.default)
        if meta["choices"] is not None:
            specs[name] = (list(meta["choices"]), {"default": default, "tooltip": meta["help"]})
            continue
        options = {"default": default if default is not None else 0, "tooltip": meta["help"]}
        if kind in (int, float):
            low = meta["low"] if meta["low"] is not None else meta["above"]
            options.update({key: value for key, value in (("min", low), ("max", meta["high"])) if value is not None})
            if kind is float:
                options["step"] = 0.01
        options.update(meta["widget"])
        specs[name] = ({bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[kind], options)
    return specs


def settings_from_widgets(method, values: dict) -> TrainSettings:
    """The TrainSettings a method's node asks for, from its widgets' values."""
    converted = {}
    for name, value in values.items():
        convert = _field(method, name).metadata["from_widget"]
        converted[name] = convert(value) if convert else value
    return TrainSettings.from_values(method.name, **converted)
