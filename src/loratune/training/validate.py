"""Type checks for config values against dataclass annotations, with messages that show a good value."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml

from ..errors import ConfigError

_TYPE_NAMES = {int: "int (a whole number)", float: "float (a number)", str: "str (text)",
               bool: "bool (true or false)", list: "a list", dict: "a mapping", type(None): "null"}
_TYPE_EXAMPLES = {int: 1, float: 0.1, str: "text", bool: True, list: ["a", "b"], dict: {"key": 1}}

BAD = object()  # marks a value that failed its type check


def checked(key: str, value: Any, hint: Any, default: Any, problems: list[str], examples: dict[str, Any]) -> Any:
    """``value`` checked against ``hint``, or ``BAD`` with the problem (and an example of a good value:
    ``examples[key]``, the default, or one of the right type) added to ``problems``."""
    try:
        return _typed(key, value, hint)
    except ConfigError as e:
        problems.append(f"{e}; e.g. {key}={_example(key, default, hint, examples)}")
        return BAD


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _options(hint: Any) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _typed(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently coerce: int -> float) a value against a field's annotation."""
    options = _options(hint)
    if value is None and type(None) in options:
        return None
    for t in options:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads "1e-4" (no dot) as a string
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool, list, dict) and isinstance(value, t):
            return value
        if t is Any:
            return value
    kinds = [typing.get_origin(t) or t for t in options]
    wanted = " or ".join(_TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in kinds)
    raise ConfigError(f"'{key}' must be {wanted}, got {value!r}")


def _example(key: str, default: Any, hint: Any, examples: dict[str, Any]) -> str:
    """A good value for ``key``, as it would be typed in an override: its default or one of the right type."""
    if key in examples:
        return as_yaml(examples[key])
    if default not in (None, "", dataclasses.MISSING):
        return as_yaml(default)
    kinds = [typing.get_origin(t) or t for t in _options(hint)]
    return next((as_yaml(_TYPE_EXAMPLES[t]) for t in kinds if t in _TYPE_EXAMPLES), "...")


def as_yaml(value: Any) -> str:
    """``value`` written the way an override spells it (true, null, [a, b])."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("...\n").strip()
