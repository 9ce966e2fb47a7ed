"""Reading local jsonl/json/csv/parquet files into rows (dicts); never downloads anything."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from .schema import EXTENSIONS, READERS, ROW_HINTS, TEXT_SUFFIXES


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
