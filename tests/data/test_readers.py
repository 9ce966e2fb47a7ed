"""Reading local files: csv with the standard library (every value the string it is), parquet with pyarrow; no
``datasets``, so nothing is downloaded or cached."""

from __future__ import annotations

import ast
import csv
import datetime
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loratune.data import read_rows
from loratune.errors import DataError

SRC = Path(__file__).resolve().parents[2] / "src"


def test_csv_values_stay_the_strings_the_file_holds(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,completion\n'
                 'a,007\n'
                 'b,NA\n'  # pandas would read a missing value
                 'c,\n'  # an empty cell: an empty string, which cleaning reports
                 '"d, with a comma","two\nlines"\n'
                 '\n'  # a blank line: skipped
                 'e,  1e3 \n'
                 'f,null\n', encoding="utf-8-sig")  # a byte-order mark, as Excel writes
    assert read_rows(f) == [{"prompt": "a", "completion": "007"}, {"prompt": "b", "completion": "NA"},
                            {"prompt": "c", "completion": ""},
                            {"prompt": "d, with a comma", "completion": "two\nlines"},
                            {"prompt": "e", "completion": "  1e3 "}, {"prompt": "f", "completion": "null"}]


def test_csv_long_cells_and_line_endings(tmp_path):
    limit = csv.field_size_limit()
    long = "x" * (limit + 1000)  # over the csv module's field limit (128 KiB by default)
    f = tmp_path / "d.csv"
    f.write_bytes(f"text\r\n{long}\r\nshort\r\n".encode())
    assert read_rows(f) == [{"text": long}, {"text": "short"}]
    assert csv.field_size_limit() == limit  # the module's limit is put back


def test_csv_row_shapes(tmp_path):
    f = tmp_path / "short.csv"
    f.write_text("prompt,completion\na,b\nc\n")
    assert read_rows(f) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    f = tmp_path / "long.csv"
    f.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"long\.csv: line 3 has 3 values but the header names 2 columns; quote"):
        read_rows(f)
    f = tmp_path / "twice.csv"
    f.write_text("prompt,prompt,completion\na,b,c\n")
    with pytest.raises(DataError, match=r"twice\.csv: the header names column\(s\) 'prompt' more than once"):
        read_rows(f)
    f = tmp_path / "first.csv"
    f.write_text("\nprompt,completion\na,b\n")
    with pytest.raises(DataError, match=r"first\.csv: the first line is empty; it must name the columns"):
        read_rows(f)
    f = tmp_path / "latin1.csv"
    f.write_bytes("prompt,completion\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"cannot read .*latin1\.csv as csv: 'utf-8' codec"):
        read_rows(f)


def test_parquet_keeps_types_and_nested_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "n": 7,
             "day": datetime.date(2021, 3, 5)}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.parquet") == rows
    pq.write_table(pa.Table.from_pylist([{"prompt": "p"}]).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet has no rows; add rows \(one row per example\)"):
        read_rows(tmp_path / "empty.parquet")


def test_no_module_in_src_imports_datasets():
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not [n for n in names if n.split(".")[0] == "datasets"], f"{path} imports datasets"


def test_reading_csv_and_parquet_loads_no_datasets_and_writes_no_cache(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\n")
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}]), tmp_path / "d.parquet")
    code = ("import sys; from loratune.data import read_rows; "
            f"assert read_rows({str(tmp_path / 'd.csv')!r}) == read_rows({str(tmp_path / 'd.parquet')!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('datasets', 'pandas')))")
    home = tmp_path / "home"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_HOME": str(home / "hf"), "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert not home.exists(), sorted(home.rglob("*"))  # no Arrow cache, no Hugging Face cache


def test_parquet_is_read_through_a_native_file(tmp_path, monkeypatch):
    """Not a Python file object: pyarrow's I/O threads reading one can abort the process as it exits ("terminate
    called without an active exception", about one run in four with torch loaded)."""
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "completion": "b"}]), tmp_path / "d.parquet")
    sources = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda source, *a, **k: sources.append(source) or real(source, *a, **k))
    assert read_rows(tmp_path / "d.parquet") == [{"prompt": "a", "completion": "b"}]
    (source,) = sources
    assert isinstance(source, pa.NativeFile) and not isinstance(source, pa.PythonFile)
