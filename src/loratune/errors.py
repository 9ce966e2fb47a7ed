"""User-facing errors: each message names the problem and the fix, on one line.

A ``ConfigError`` that collects several problems lists them one per line, under a count.

The CLI prints ``LoraTuneError`` messages without a stack trace; the Python API raises them with
``from None`` so users see the message, not the machinery behind it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping


class LoraTuneError(Exception):
    """Base class of every error loratune raises on purpose."""


class ConfigError(LoraTuneError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class ConfigWarning(UserWarning):
    """A configuration that works, but probably not as meant (e.g. max_steps and epochs both set)."""


class AdapterFileError(LoraTuneError, ValueError):
    """An adapter directory or file is missing, corrupt or does not fit the model."""


class DataError(LoraTuneError, ValueError):
    """A dataset file is missing, unreadable or has rows of the wrong shape."""


def closest(name: str, choices: Iterable[str], synonyms: Mapping[str, str] | None = None) -> str:
    """A ' (did you mean X?)' hint for a misspelt name; the valid names when none is close.

    ``synonyms`` (lower-case names from other tools -> a valid name) are consulted before the fuzzy match,
    which would answer 'warmup_ratio' for 'learning_rate'.
    """
    choices = sorted(choices)
    norm = name.lower().replace("-", "_")
    target = (synonyms or {}).get(norm, norm)
    if target in choices:
        return f" (did you mean '{target}'?)"
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(choices)})" if choices else ""
