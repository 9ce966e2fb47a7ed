"""Rows to chat messages: format detection and conversion, whitespace, malformed rows and duplicates, with every
count in the report."""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import DataError, closest
from .schema import FORMATS, REQUIRED, ROLES, Row, Step


def detect_format(rows: list[dict[str, Any]]) -> str:
    """The format whose keys the rows carry (keys with a non-null value in any row count)."""
    if not rows:
        raise DataError("cannot detect the data format: there are no rows; add rows to the data file")
    keys = {k for row in rows for k, v in row.items() if v is not None}
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    raise DataError(f"cannot detect the data format from keys {sorted(keys)}; rows need prompt/completion, "
                    "instruction/output, messages, conversations or text, or set data.format (loratune eval: --format)")


def _convert(row: dict[str, Any], fmt: str) -> tuple[list[dict[str, str]] | None, str]:
    """(messages, '') or (None, why the row is malformed); contents stripped, text → one assistant turn."""
    def text(key: str, optional: bool = False) -> str | None:
        v = row.get(key)
        if v is None and optional:
            return ""
        return v.strip() if isinstance(v, str) else None

    if fmt in ("prompt_completion", "alpaca", "text"):
        keys = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "input", "output"),
                "text": ("text",)}[fmt]
        vals = {k: text(k, optional=k == "input") for k in keys}
        bad = [k for k, v in vals.items() if v is None]
        if bad:
            return None, f"'{bad[0]}' is {type(row.get(bad[0])).__name__}, not a string"
        empty = [k for k, v in vals.items() if not v and k != "input"]
        if empty:
            return None, f"empty {', '.join(repr(k) for k in empty)}"
        if fmt == "text":
            return [{"role": "assistant", "content": vals["text"]}], ""
        if fmt == "prompt_completion":
            user = vals["prompt"]
        else:
            user = vals["instruction"] + (f"\n\n{vals['input']}" if vals["input"] else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": vals[keys[-1]]}], ""
    key, role_key, content_key = ("messages", "role", "content") if fmt == "messages" \
        else ("conversations", "from", "value")
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        return None, f"'{key}' is not a non-empty list"
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return None, f"{key}[{i}] is not an object"
        role, content = turn.get(role_key), turn.get(content_key)
        valid = ("system", "user", "assistant") if fmt == "messages" else ("system", "human", "gpt")
        if role not in valid:
            return None, f"{key}[{i}] has {role_key} {role!r}, not one of {'/'.join(valid)}"
        if not isinstance(content, str):
            return None, f"{key}[{i}] has no string '{content_key}'"
        if not content.strip():
            return None, f"{key}[{i}] has empty '{content_key}'"
        messages.append({"role": ROLES[role], "content": content.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant turn to train on"
    return messages, ""


def missing_keys(row: dict[str, Any], fmt: str) -> list[str]:
    return [k for k in REQUIRED[fmt] if row.get(k) is None]


def to_messages(row: dict[str, Any], fmt: str, row_number: int) -> list[dict[str, str]]:
    """One row as chat messages (``role``/``content``, stripped); DataError naming the row and problem."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'{closest(fmt, FORMATS)}; "
                        f"use one of: {', '.join(FORMATS)}")
    missing = missing_keys(row, fmt)
    if missing:
        raise DataError(f"row {row_number} has no {', '.join(repr(k) for k in missing)} (format {fmt}); "
                        "add the keys or set data.format")
    messages, why = _convert(row, fmt)
    if messages is None:
        raise DataError(f"row {row_number}: {why}; fix or remove that row")
    return messages


def _rows_list(numbers: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def _rows_phrase(numbers: list[int]) -> str:
    """``row 3`` or ``rows 1, 2, 3, 4, 5 and 7 more``."""
    return f"rows {_rows_list(numbers)}" if len(numbers) > 1 else f"row {numbers[0]}"


def _grouped(items: list[tuple[int, Any]]) -> list[tuple[Any, list[int]]]:
    """(value, row numbers) for each distinct value of ``(row number, value)`` pairs, in order of first row."""
    groups: dict[Any, list[int]] = {}
    for n, value in items:
        groups.setdefault(value, []).append(n)
    return list(groups.items())


def _grouped_message(items: list[tuple[int, Any]], describe, rest_phrase, limit: int = 3) -> str:
    """'; '-joined ``describe(value, rows)`` for the first ``limit`` groups of equal values, then the rest counted."""
    groups = _grouped(items)
    parts = [describe(value, ns) for value, ns in groups[:limit]]
    rest = sum(len(ns) for _, ns in groups[limit:])
    if rest:
        parts.append(rest_phrase(rest))
    return "; ".join(parts)


def _missing_message(missing: list[tuple[int, tuple[str, ...]]]) -> str:
    """``row 9 lacks 'completion'; row 10 lacks 'prompt', 'completion'``: rows grouped by the keys they lack."""
    return _grouped_message(
        missing, lambda keys, ns: f"{_rows_phrase(ns)} {'lack' if len(ns) > 1 else 'lacks'} "
                                  f"{', '.join(repr(k) for k in keys)}",
        lambda rest: f"and {rest} more row{'s lack' if rest > 1 else ' lacks'} other keys")


def _dropped_message(bad: list[tuple[int, str]]) -> str:
    """``10 rows dropped (rows 1, 2, 3, 4, 5 and 5 more): empty 'prompt'``: dropped rows grouped by reason."""
    return _grouped_message(
        bad, lambda why, ns: f"{len(ns)} row{'s' if len(ns) > 1 else ''} dropped ({_rows_phrase(ns)}): {why}",
        lambda rest: f"and {rest} more dropped for other reasons")


def clean_rows(rows: list[dict], fmt: str, label: str, path: str, report: list[Step]) -> list[Row]:
    """Convert, strip, drop empty/malformed rows and duplicates; every count goes into ``report``.

    Rows that lack a key the format requires are an error naming them (a wrong format or a broken export,
    not data to drop); so is a file whose every row is empty or malformed.
    """
    report.append(Step(f"{label}: rows read", len(rows), f"{path}, format {fmt}"))
    missing = [(n, tuple(missing_keys(r, fmt))) for n, r in enumerate(rows, 1) if missing_keys(r, fmt)]
    if missing:
        raise DataError(f"{path}: {_missing_message(missing)} (format {fmt}); add the missing keys to those "
                        "rows, remove the rows, or set data.format")
    stripped, bad, kept = 0, [], []
    for n, row in enumerate(rows, 1):
        messages, why = _convert(row, fmt)
        if messages is None:
            bad.append((n, why))
            continue
        raw = [row.get(k) for k in REQUIRED[fmt] + (("input",) if fmt == "alpaca" else ())]
        if json.dumps(raw, default=str) != json.dumps(_strip_all(raw), default=str):
            stripped += 1
        kept.append((n, messages))
    report.append(Step(f"{label}: rows with surrounding whitespace stripped", stripped))
    if not kept:
        raise DataError(f"{path} has no usable rows after cleaning ({len(rows)} read, all dropped): "
                        f"{_dropped_message(bad)}; fill in or fix those rows")
    report.append(Step(f"{label}: empty or malformed rows dropped", len(bad),
                       "; ".join(f"row {n}: {why}" for n, why in bad[:8])
                       + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")))
    seen_exact, seen_norm, out, n_exact, n_norm = set(), set(), [], 0, 0
    for n, messages in kept:
        exact = json.dumps(messages)
        if exact in seen_exact:
            n_exact += 1
            continue
        seen_exact.add(exact)
        if norm_key(messages) in seen_norm:
            n_norm += 1
            continue
        seen_norm.add(norm_key(messages))
        out.append((n, messages))
    report.append(Step(f"{label}: exact duplicates removed", n_exact))
    report.append(Step(f"{label}: near duplicates removed (case/whitespace)", n_norm))
    return out


def _strip_all(v: Any) -> Any:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, list):
        return [_strip_all(x) for x in v]
    if isinstance(v, dict):
        return {k: _strip_all(x) for k, x in v.items()}
    return v


def norm_key(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], re.sub(r"\s+", " ", m["content"].lower())] for m in messages])
