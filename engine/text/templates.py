"""Prompt templates: how a training prompt names the objects ("a photo of {}")."""
from __future__ import annotations

from ..errors import InputError

DEFAULT_TEMPLATES = (
    "a photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
)


def check_template(template, what: str, filled_with: str) -> None:
    """A prompt template must take one value through str.format and show it exactly once."""
    try:
        ok = isinstance(template, str) and template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):  # "{} {}", "{name}", a lone "{"
        ok = False
    if not ok:
        raise InputError(f"{what} {template!r} needs exactly one '{{}}' where {filled_with} go(es), and no other "
                         "braces (write '{{' or '}}' for a literal brace).")
