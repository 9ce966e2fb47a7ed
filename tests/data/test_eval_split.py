"""data.eval_split: auto — a small held-out share when there is no eval file, said in the report, never a row (by
content, after de-duplication) on both sides; nothing held out of small data or when an eval file is given."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from loratune.data import DataConfig, prepare
from loratune.data.pipeline import held_out_count
from loratune.models import resolve_model_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _text(tok, ex) -> str:
    return re.sub(r"\s+", " ", tok.decode(ex.input_ids).lower())


def test_held_out_share_bounds():
    assert [held_out_count(n) for n in (10, 99)] == [0, 0]
    assert held_out_count(100) == 20 and held_out_count(300) == 32  # a fifth at most; at least 32
    assert held_out_count(600) == 60 and held_out_count(10**6) == 500
    for n in range(100, 3000, 37):
        k = held_out_count(n)
        assert 0.05 * n <= k <= n // 5 or k == 500


def test_auto_holds_out_without_leaking_rows(tmp_path, tok):
    rows = [{"prompt": f"Spell {i}", "completion": f"number {i}"} for i in range(300)]
    # duplicates and near-duplicates (case, whitespace) of some rows: after de-duplication each is one row
    rows += [{"prompt": f"  SPELL {i}", "completion": f"Number  {i} "} for i in range(0, 300, 7)]
    rows += [dict(rows[i]) for i in range(0, 300, 11)]
    path = _write(tmp_path / "t.jsonl", rows)
    data = prepare(DataConfig(train=path, eval_split="auto"), tok, seed=5)
    assert len(data.eval) == 32 and len(data.train) == 268
    train_texts, eval_texts = {_text(tok, e) for e in data.train}, {_text(tok, e) for e in data.eval}
    assert not train_texts & eval_texts and len(eval_texts) == 32
    assert any("eval_split=auto" in line and line.endswith(": 32") for line in data.report_lines())
    again = prepare(DataConfig(train=path, eval_split="auto"), tok, seed=5)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in data.eval]  # chosen by the seed


def test_auto_leaves_small_data_and_a_given_eval_file_alone(tmp_path, tok):
    small = _write(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(60)])
    data = prepare(DataConfig(train=small, eval_split="auto"), tok)
    assert len(data.train) == 60 and not data.eval
    assert any(line.startswith("eval: none held out (eval_split=auto") for line in data.report_lines())
    big = _write(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(300)])
    ev = _write(tmp_path / "e.jsonl", [{"prompt": f"q{i}", "completion": f"d{i}"} for i in range(10)])
    data = prepare(DataConfig(train=big, eval=ev, eval_split="auto"), tok)
    assert len(data.train) == 300 and len(data.eval) == 10
    data = prepare(DataConfig(train=big, eval_split=0.5), tok)  # a number is that share, untouched by auto
    assert len(data.train) == len(data.eval) == 150


def test_bad_eval_split_is_one_line():
    with pytest.raises(Exception, match=r"data.eval_split must be a fraction in \[0, 1\) or auto, got 'some'"):
        DataConfig(train="x", eval_split="some")
