"""Data preparation: read local files, clean them, template them into token ids with loss masks.

Pipeline (:func:`prepare`): read a local jsonl/json/csv/parquet file (:func:`read_rows`; a missing, empty or
unsupported file is an error) → refuse the file if any row lacks a key its format requires (the error names
those rows: no row is lost silently) → convert each row to chat messages (formats below) → strip whitespace →
drop rows with empty or wrongly typed values (reported with their row numbers; an error if none are left) →
exact and normalized de-duplication → drop train rows that also appear in the eval set → tokenize through the
tokenizer's chat template (loss only on assistant turns unless ``train_on_prompt``) → drop or truncate
over-length rows → optional packing. Every step's count goes into :attr:`PreparedData.report`.

Formats (``format: auto`` detects them from the keys):

- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``
- ``alpaca``: ``{"instruction": ..., "input": ... (optional), "output": ...}``
- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}``
- ``text``: ``{"text": ...}``; no chat template, every token is trained.

Row numbers in messages count data rows from 1 (for jsonl: the line number, if no line is blank).
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, closest

FORMATS = ("prompt_completion", "alpaca", "messages", "sharegpt", "text")
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXTENSIONS = ", ".join(READERS)
TEXT_SUFFIXES = (".txt", ".text", ".md")  # refused (one example per line? per file?), with how to convert
ROW_HINTS = {".jsonl": 'one JSON object per line, e.g. {"prompt": "...", "completion": "..."}',
             ".json": "a JSON list of objects", ".csv": "a header line naming the columns, then one line per row",
             ".parquet": "one row per example"}
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
IGNORE = -100
Row = tuple[int, list[dict]]  # (row number in the file, chat messages)
REQUIRED = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"),
            "messages": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}


@dataclass
class DataConfig:
    """The ``data`` section of a run config.

    ``eval`` is a held-out file; without one, ``eval_split`` (a fraction in [0, 1)) of the cleaned train rows
    is held out, chosen by the seed. ``overlength`` is ``drop`` or ``truncate`` (rows over ``max_seq_len``
    tokens). ``chat_template`` overrides the tokenizer's Jinja template; ``system_prompt`` is prepended to
    rows that have no system message.
    """

    train: str
    eval: str | None = None
    eval_split: float = 0.0
    format: str = "auto"
    max_seq_len: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    overlength: str = "drop"
    chat_template: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.format != "auto" and self.format not in FORMATS:
            raise DataError(f"unknown data format '{self.format}'{closest(self.format, FORMATS)}; "
                            f"use auto or one of: {', '.join(FORMATS)}")
        if self.overlength not in ("drop", "truncate"):
            raise DataError(f"data.overlength must be 'drop' or 'truncate', got {self.overlength!r}")
        if self.max_seq_len < 2:
            raise DataError(f"data.max_seq_len must be ≥ 2, got {self.max_seq_len}")
        if not 0.0 <= self.eval_split < 1.0:
            raise DataError(f"data.eval_split must be a fraction in [0, 1), got {self.eval_split}")


@dataclass
class Example:
    """One tokenized row. ``labels`` align with ``input_ids`` (-100 = no loss; the model shifts them).

    ``prompt_ids`` is the prompt with the generation prompt appended and ``reference`` the last assistant
    answer, for generation-based evaluation (empty/None for text rows and packed rows). ``position_ids``
    is set only on packed rows: it restarts at 0 at each packed example.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    reference: str | None = None
    position_ids: list[int] | None = None


@dataclass
class Step:
    """One line of the preparation report: ``count`` rows affected by step ``name``; ``detail`` says which."""

    name: str
    count: int
    detail: str = ""


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: list[Step]
    format: str

    def report_lines(self) -> list[str]:
        """The report as printable lines, e.g. ``train: exact duplicates removed: 3``."""
        return [f"{s.name}: {s.count}" + (f" ({s.detail})" if s.detail else "") for s in self.report]


# ---------------------------------------------------------------- reading and converting rows


def check_data_file(path: str | Path, what: str = "data file") -> Path:
    """``path`` as an existing file with a supported extension, else a DataError saying what it is instead.

    Reads nothing, so config loading can call it before a model is loaded. ``what`` names the file in
    messages (e.g. ``"eval file"``).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} {p} is a directory, but a data file is expected ({EXTENSIONS}); "
                        "point data.train / data.eval / --data at a file inside it")
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; check the path (data.train / data.eval / --data)")
    if p.suffix.lower() not in READERS:
        raise DataError(f"{what} {p} {_extension_problem(p)}")
    return p


def _extension_problem(p: Path) -> str:
    """What is wrong with the extension of ``p`` and how to fix it (the end of a one-line message)."""
    if not p.suffix:
        return f"has no extension, so its format is unknown; rename it to end in one of {EXTENSIONS}"
    if p.suffix.lower() in TEXT_SUFFIXES:
        return (f"has unsupported extension '{p.suffix}': plain text does not say where an example starts or "
                'ends; convert it to a .jsonl file with one JSON object per line, {"text": "..."}, for '
                "data.format=text (e.g. jq -cR '{text: .}' in.txt > out.jsonl, one example per line), or "
                f'{{"prompt": "...", "completion": "..."}} per line for prompt/answer pairs; supported: {EXTENSIONS}')
    return f"has unsupported extension '{p.suffix}'; use one of {EXTENSIONS}"


def _is_blank(p: Path) -> bool:
    """True if the file holds nothing but whitespace (and byte-order marks); stops at the first content."""
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.replace(b"\xef\xbb\xbf", b"").strip():
                return False
    return True


def _no_rows(p: Path, what: str) -> str:
    """The one-line message for a file that yielded no rows: empty, an empty list, or a header only."""
    if _is_blank(p):
        state = "is empty: it has no rows"
    else:
        state = {".json": "has no rows (an empty JSON list)",
                 ".csv": "has no rows (only a header line)"}.get(p.suffix.lower(), "has no rows")
    return (f"{what} {p} {state}; add rows ({ROW_HINTS[p.suffix.lower()]}) "
            "or point data.train / data.eval / --data at another file")


def read_rows(path: str | Path, what: str = "data file") -> list[dict[str, Any]]:
    """All rows of a local jsonl/json/csv/parquet file (never downloads anything); at least one.

    csv and parquet go through ``datasets`` (csv columns read as strings). json/jsonl are parsed with the
    standard library: pyarrow's JSON reader, which ``datasets`` uses, turns ISO date strings such as
    ``2021-03-05`` into timestamps, which would corrupt exactly the answers of a date task. ``what`` names
    the file in error messages (e.g. ``"eval file"``).
    """
    p = check_data_file(path, what)
    kind = READERS[p.suffix.lower()]
    if _is_blank(p):
        raise DataError(_no_rows(p, what))
    try:
        rows = _read_json(p) if kind == "json" else _read_with_datasets(p, kind)
    except DataError:
        raise
    except Exception as e:  # datasets wraps the parser's error; show the innermost one
        while e.__cause__ is not None:
            e = e.__cause__
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot read {p} as {kind}: {reason}; fix or re-export the file") from None
    if not rows:
        raise DataError(_no_rows(p, what))
    return rows


def _read_json(p: Path) -> list[dict[str, Any]]:
    text = p.read_text(encoding="utf-8-sig")
    whole: Any = None
    if p.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass  # maybe JSON lines in a .json file
    if isinstance(whole, dict):
        raise DataError(f"cannot read {p}: one JSON object, not rows; write a list of objects or JSON lines")
    if isinstance(whole, list):
        rows, where = whole, [f"item {i}" for i in range(1, len(whole) + 1)]
    else:
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"cannot read {p}: line {n} is not valid JSON ({e.msg}); fix that line "
                                    "(jsonl needs one JSON object per line)") from None
                where.append(f"line {n}")
    bad = [w for w, r in zip(where, rows) if not isinstance(r, dict)]
    if bad:
        raise DataError(f"cannot read {p}: {', '.join(bad[:5])} not a JSON object; make every row an object")
    return rows


def _read_with_datasets(p: Path, kind: str) -> list[dict[str, Any]]:
    import datasets

    features = None
    if kind == "csv":  # every column as a string: pandas would turn "42" or "007" into numbers
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            has_rows = any(reader)  # stops at the first non-blank row
        if not header:
            raise DataError(f"cannot read {p}: the first line is empty; it must name the columns")
        if not has_rows:
            return []  # only a header: read_rows says the file has no rows
        features = datasets.Features({c: datasets.Value("string") for c in header})
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train", features=features).to_list()
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def detect_format(rows: list[dict[str, Any]]) -> str:
    """The format whose keys the rows carry (keys with a non-null value in any row count)."""
    if not rows:
        raise DataError("cannot detect the data format: there are no rows; add rows to the data file")
    keys = {k for row in rows for k, v in row.items() if v is not None}
    for fmt in ("messages", "sharegpt", "alpaca", "prompt_completion", "text"):
        if set(REQUIRED[fmt]) <= keys:
            return fmt
    raise DataError(f"cannot detect the data format from keys {sorted(keys)}; rows need prompt/completion, "
                    "instruction/output, messages, conversations or text, or set data.format")


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


def _missing(row: dict[str, Any], fmt: str) -> list[str]:
    return [k for k in REQUIRED[fmt] if row.get(k) is None]


def to_messages(row: dict[str, Any], fmt: str, row_number: int) -> list[dict[str, str]]:
    """One row as chat messages (``role``/``content``, stripped); DataError naming the row and problem."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'{closest(fmt, FORMATS)}; "
                        f"use one of: {', '.join(FORMATS)}")
    missing = _missing(row, fmt)
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


def _clean(rows: list[dict], fmt: str, label: str, path: str, report: list[Step]) -> list[Row]:
    """Convert, strip, drop empty/malformed rows and duplicates; every count goes into ``report``.

    Rows that lack a key the format requires are an error naming them (a wrong format or a broken export,
    not data to drop); so is a file whose every row is empty or malformed.
    """
    report.append(Step(f"{label}: rows read", len(rows), f"{path}, format {fmt}"))
    missing = [(n, tuple(_missing(r, fmt))) for n, r in enumerate(rows, 1) if _missing(r, fmt)]
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
        if _norm_key(messages) in seen_norm:
            n_norm += 1
            continue
        seen_norm.add(_norm_key(messages))
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


def _norm_key(messages: list[dict[str, str]]) -> str:
    return json.dumps([[m["role"], re.sub(r"\s+", " ", m["content"].lower())] for m in messages])


# ---------------------------------------------------------------- tokenizing


def _render(tokenizer, messages: list[dict], template: str | None, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _ends_turn(tokenizer, text: str) -> bool:
    return any(text.rstrip().endswith(t) for t in (*END_TOKENS, tokenizer.eos_token) if t)


def tokenize_messages(tokenizer, messages: list[dict], cfg: DataConfig, fmt: str) -> Example:
    """Token ids and labels of one conversation: loss on every assistant turn (through its end-of-turn
    token, appending EOS where the template writes none), or on everything with ``train_on_prompt``."""
    if fmt == "text":
        ids = list(tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return Example(ids, list(ids))
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
    t = cfg.chat_template
    full = _render(tokenizer, messages, t, False)
    spans, cursor = [], 0  # (start, end) character spans of the assistant turns in `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], t, True)
        upto = _render(tokenizer, messages[:i + 1], t, False)
        if upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(upto.rstrip())
        else:  # template is not prefix-stable (e.g. rewrites earlier turns): find the content instead
            start = full.find(m["content"], cursor)
            if start < 0:
                continue
            end = start + len(m["content"])
            for tok in (*END_TOKENS, tokenizer.eos_token):
                at = full.find(tok, end) if tok else -1
                if at >= 0 and not full[end:at].strip():
                    end = at + len(tok)
                    break
        if end > start:
            spans.append((start, end))
            cursor = end
    ids, labels, pos = [], [], 0
    for start, end in spans:
        head, body = _ids(tokenizer, full[pos:start]), _ids(tokenizer, full[start:end])
        if not _ends_turn(tokenizer, full[start:end]) and tokenizer.eos_token_id is not None:
            body.append(tokenizer.eos_token_id)
        ids += head + body
        labels += (head if cfg.train_on_prompt else [IGNORE] * len(head)) + body
        pos = end
    tail = _ids(tokenizer, full[pos:])
    ids += tail
    labels += tail if cfg.train_on_prompt else [IGNORE] * len(tail)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = _ids(tokenizer, _render(tokenizer, messages[:last], t, True))
    return Example(ids, labels, prompt, messages[last]["content"])


def _tokenize_all(tokenizer, convs: list[Row], cfg: DataConfig, fmt: str, label: str,
                  report: list[Step]) -> list[Example]:
    """Tokenize, apply the over-length policy and check that something is trained."""
    if fmt != "text" and cfg.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set data.chat_template to a Jinja template "
                        "string, or use data.format=text for plain text")
    from jinja2 import TemplateError

    examples, rejected = [], []
    for n, messages in convs:
        try:
            examples.append(tokenize_messages(tokenizer, messages, cfg, fmt))
        except TemplateError as e:  # a template may refuse a row, e.g. roles that do not alternate
            rejected.append(f"row {n}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    if rejected:
        report.append(Step(f"{label}: rows the chat template rejected", len(rejected),
                           "; ".join(rejected[:5])))
    long = [e for e in examples if len(e.input_ids) > cfg.max_seq_len]
    if cfg.overlength == "drop":
        examples = [e for e in examples if len(e.input_ids) <= cfg.max_seq_len]
        report.append(Step(f"{label}: rows over max_seq_len={cfg.max_seq_len} tokens dropped", len(long)))
    else:
        for e in long:
            e.input_ids, e.labels = e.input_ids[:cfg.max_seq_len], e.labels[:cfg.max_seq_len]
        report.append(Step(f"{label}: rows over max_seq_len={cfg.max_seq_len} tokens truncated", len(long)))
    if examples and all(v == IGNORE for e in examples for v in e.labels[1:]):
        raise DataError(f"{label}: every label is masked, so there is nothing to train on: raise "
                        f"data.max_seq_len (now {cfg.max_seq_len}), use overlength=drop, or check that the "
                        "chat template writes the assistant turns")
    empty = [e for e in examples if all(v == IGNORE for v in e.labels[1:])]
    if empty:
        examples = [e for e in examples if any(v != IGNORE for v in e.labels[1:])]
        report.append(Step(f"{label}: rows with no trained tokens left dropped", len(empty)))
    return examples


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Greedily concatenate examples into rows of at most ``max_seq_len`` tokens, in order.

    ``position_ids`` restart at each example and each example's first label is masked, so no token is
    trained to predict across a boundary (attention still crosses it unless the attention kernel uses
    the position resets, as flash-attention varlen does).
    """
    rows: list[Example] = []
    cur = Example([], [], position_ids=[])
    for e in examples:
        if cur.input_ids and len(cur.input_ids) + len(e.input_ids) > max_seq_len:
            rows.append(cur)
            cur = Example([], [], position_ids=[])
        cur.input_ids += e.input_ids
        cur.labels += [IGNORE] + e.labels[1:]
        cur.position_ids += list(range(len(e.input_ids)))
    if cur.input_ids:
        rows.append(cur)
    return rows


# ---------------------------------------------------------------- the pipeline


def split_rows(rows: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval): ``fraction`` of ``rows`` (at least one, leaving at least one) held out by ``seed``."""
    if fraction <= 0:
        return list(rows), []
    if len(rows) < 2:
        raise DataError(f"data.eval_split={fraction} needs at least 2 cleaned rows, have {len(rows)}; "
                        "add rows or set data.eval_split=0")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(len(rows) * fraction)), len(rows) - 1)
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _load(path: str, fmt: str, label: str, report: list[Step]) -> tuple[list[Row], str]:
    """The cleaned rows of one file (at least one) and their format; ``label`` is ``train`` or ``eval``."""
    rows = read_rows(path, f"{label} file")
    if fmt == "auto":
        try:
            fmt = detect_format(rows)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    return _clean(rows, fmt, label, path, report), fmt


def prepare(cfg: DataConfig, tokenizer, seed: int = 0) -> PreparedData:
    """Read, clean, split, tokenize (and pack) the train and eval data of ``cfg``, reporting each step."""
    if cfg.eval and cfg.eval_split:
        raise DataError("data.eval and data.eval_split are both set; keep the eval file or the split")
    report: list[Step] = []
    train, fmt = _load(cfg.train, cfg.format, "train", report)
    evals: list[Row] = []
    eval_fmt = fmt
    if cfg.eval:
        evals, eval_fmt = _load(cfg.eval, cfg.format, "eval", report)
        held = {_norm_key(m) for _, m in evals}
        before = len(train)
        train = [(n, m) for n, m in train if _norm_key(m) not in held]
        report.append(Step("train: rows also in the eval set removed (leakage)", before - len(train)))
    elif cfg.eval_split:
        train, evals = split_rows(train, cfg.eval_split, seed)
        report.append(Step(f"eval: rows held out of train (eval_split={cfg.eval_split}, seed={seed})",
                           len(evals)))
    if not train:
        raise DataError(f"no train rows left after cleaning {cfg.train}; every row was also in the eval set "
                        "or was dropped — see the report")
    train_ex = _tokenize_all(tokenizer, train, cfg, fmt, "train", report)
    if not train_ex:
        raise DataError(f"no train rows left after tokenizing {cfg.train}: all exceed max_seq_len="
                        f"{cfg.max_seq_len}; raise data.max_seq_len or set data.overlength=truncate")
    eval_ex = _tokenize_all(tokenizer, evals, cfg, eval_fmt, "eval", report) if evals else []
    if cfg.packing:
        n = len(train_ex)
        train_ex = pack(train_ex, cfg.max_seq_len)
        report.append(Step(f"train: {n} examples packed into rows of ≤{cfg.max_seq_len} tokens",
                           len(train_ex)))
    report.append(Step("train: examples ready", len(train_ex),
                       f"{sum(len(e.input_ids) for e in train_ex)} tokens, "
                       f"{sum(v != IGNORE for e in train_ex for v in e.labels[1:])} trained"))
    report.append(Step("eval: examples ready", len(eval_ex)))
    return PreparedData(train_ex, eval_ex, report, fmt)


def prepare_eval(cfg: DataConfig, tokenizer) -> tuple[list[Example], list[Step]]:
    """Only ``cfg.train`` as evaluation examples (cleaned and tokenized like eval rows, never packed)."""
    report: list[Step] = []
    convs, fmt = _load(cfg.train, cfg.format, "eval", report)
    examples = _tokenize_all(tokenizer, convs, cfg, fmt, "eval", report)
    if not examples:
        raise DataError(f"no rows of {cfg.train} fit max_seq_len={cfg.max_seq_len}; raise it")
    return examples, report


def collate(examples: list[Example], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (pad_id), attention_mask (0 on padding), labels (-100 on padding),
    and position_ids when any example is packed."""
    pad = 0 if pad_id is None else pad_id
    width = max(len(e.input_ids) for e in examples)
    batch = {
        "input_ids": torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids))
                                        for e in examples]),
        "labels": torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in examples]),
    }
    if any(e.position_ids is not None for e in examples):
        batch["position_ids"] = torch.tensor([
            (e.position_ids if e.position_ids is not None else list(range(len(e.input_ids))))
            + [0] * (width - len(e.input_ids)) for e in examples])
    return batch


def format_example(tokenizer, example: Example) -> str:
    """The example's text with trained tokens wrapped in ``[[ ]]`` (for ``--dry-run``)."""
    parts, run, trained = [], [], None
    for tok, lab in zip(example.input_ids, example.labels):
        if run and (lab != IGNORE) != trained:
            text = tokenizer.decode(run, skip_special_tokens=False)
            parts.append(f"[[{text}]]" if trained else text)
            run = []
        run.append(tok)
        trained = lab != IGNORE
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)
