"""User-facing errors: each message names the problem and the fix, on one line.

The CLI prints ``LoraTuneError`` messages without a stack trace; the Python API raises them with
``from None`` so users see the message, not the machinery behind it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoraTuneError(Exception):
    """Base class of every error loratune raises on purpose."""


class ConfigError(LoraTuneError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class AdapterFileError(LoraTuneError, ValueError):
    """An adapter directory or file is missing, corrupt or does not fit the model."""


class DataError(LoraTuneError, ValueError):
    """A dataset file is missing, unreadable or has rows of the wrong shape."""


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint for a misspelt name; the valid names when none is close."""
    choices = sorted(choices)
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.4)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return f" (valid: {', '.join(choices)})" if choices else ""
