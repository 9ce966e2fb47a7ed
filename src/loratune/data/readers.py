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

    json/jsonl and csv are parsed with the standard library, parquet with ``pyarrow.parquet``; nothing touches
    the network or writes a cache. CSV values stay the strings the file holds ("007", "NA" and "2021-03-05"
    as written; an empty cell is ""); pyarrow's JSON reader would turn ISO date strings such as
    ``2021-03-05`` into timestamps, which would corrupt exactly the answers of a date task. ``what`` names
    the file in error messages (e.g. ``"eval file"``).
    """
    p = check_data_file(path, what)
    kind = READERS[p.suffix.lower()]
    if _is_blank(p):
        raise DataError(_no_rows(p, what))
    try:
        rows = {"json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](p)
    except DataError:
        raise
    except Exception as e:  # the parser's own error (innermost, where one wraps another), on one line
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


def _read_csv(p: Path) -> list[dict[str, Any]]:
    """Every value as the string the file holds: "007" stays "007", "NA" stays "NA" (pandas would read 7 and a
    missing value), an empty cell is "". Blank lines are skipped; a line with more values than the header names
    is an error; a line with fewer gives None for the columns it lacks (a row without those keys)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long document in one cell is data (the default limit is 128 KiB)
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or not any(name.strip() for name in header):
                raise DataError(f"cannot read {p}: the first line is empty; it must name the columns")
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                raise DataError(f"cannot read {p}: the header names column(s) {', '.join(map(repr, twice))} more "
                                "than once, so one would hide the other; give every column its own name")
            rows = []
            for values in reader:
                if not values or (len(values) == 1 and not values[0].strip()):
                    continue  # a blank line (a line of empty values ",," is a row, of empty strings)
                if len(values) > len(header):
                    raise DataError(f"cannot read {p}: line {reader.line_num} has {len(values)} values but the "
                                    f"header names {len(header)} columns; quote values that hold commas "
                                    '("a, b") or fix that line')
                rows.append({name: values[i] if i < len(values) else None for i, name in enumerate(header)})
            return rows
    finally:
        csv.field_size_limit(limit)


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    """The rows of a parquet file, read through a native local file: pyarrow resolves no file system or URI, and
    no Python file object is read from pyarrow's I/O threads (with one, a process can abort as it exits:
    "terminate called without an active exception", seen in about one run in four with pyarrow 26)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pa.OSFile(str(p)) as f:
        return pq.ParquetFile(f).read().to_pylist()
