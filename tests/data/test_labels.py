"""Labelled data for classification: the label set and its file, reading text/label columns, bad labels, the
balanced class weights, and the generated intent task."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from loratune.data import DataConfig
from loratune.data.intents import HELD_OUT_TEMPLATES, LABELS, TEMPLATES, intent_rows, make_intent_task
from loratune.data.labels import LABELS_NAME, LabelSet, balanced_weights, prepare_labelled, read_labelled
from loratune.errors import AdapterFileError, DataError


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_label_set_is_sorted_and_round_trips_through_its_file(tmp_path):
    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate(["b", "c", "a", "b", "c", "c"])]
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", rows))
    data = prepare_labelled(cfg)
    assert data.labels.labels == ("a", "b", "c")  # sorted, whatever the order of the rows
    assert data.train_ids == [1, 2, 0, 1, 2, 2]
    assert data.labels.id2label() == {0: "a", 1: "b", 2: "c"}
    data.labels.save(tmp_path)
    again = LabelSet.load(tmp_path)
    assert again == data.labels
    assert again.ids(data.train, "t") == data.train_ids
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert prepare_labelled(DataConfig(train=_jsonl(tmp_path / "s.jsonl", shuffled))).labels == data.labels


def test_numeric_labels_keep_their_numbers_and_match_csv_text(tmp_path):
    rows = [{"text": f"t{i}", "label": v} for i, v in enumerate([2, 0, 1, 10, 2])]
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", rows))
    labels = prepare_labelled(cfg).labels
    assert labels.labels == (0, 1, 2, 10) and labels.kind == "int"  # numbers sort by value, not as text
    csv = tmp_path / "e.csv"
    csv.write_text("text,label\nx,10\ny,0\n")  # CSV holds "10": the same label as 10
    assert labels.ids(read_labelled(str(csv), labels, "eval file"), "eval") == [3, 0]
    labels.save(tmp_path)
    assert LabelSet.load(tmp_path).labels == (0, 1, 2, 10)
    text = LabelSet(("0", "1"))
    assert text.ids(read_labelled(_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 1}]), text, "f"), "f") == [1]


def test_columns_are_configurable_and_pairs_are_read(tmp_path):
    rows = [{"q": "a?", "doc": "b", "y": "yes"}, {"q": "c?", "doc": "d", "y": "no"}]
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", rows), text_column="q", text_pair_column="doc",
                     label_column="y")
    data = prepare_labelled(cfg)
    assert [(r.text, r.pair, r.label) for r in data.train] == [("a?", "b", "yes"), ("c?", "d", "no")]
    assert (data.labels.text_column, data.labels.text_pair_column, data.labels.label_column) == ("q", "doc", "y")


def test_eval_split_holds_out_rows_by_seed(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)]
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", rows), eval_split=0.25)
    a, b = prepare_labelled(cfg, seed=1), prepare_labelled(cfg, seed=1)
    assert len(a.eval) == 5 and len(a.train) == 15 and a.eval == b.eval
    assert {r.text for r in a.eval}.isdisjoint(r.text for r in a.train)
    assert {r.text for r in prepare_labelled(cfg, seed=2).eval} != {r.text for r in a.eval}


@pytest.mark.parametrize("rows, eval_rows, message", [
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], [{"text": "c", "label": "z"}],
     r"eval file .* row 1 has label 'z', which training never saw \(the adapter's labels: 'x', 'y'\)"),
    ([{"text": "a", "label": ""}, {"text": "b", "label": None}], None,
     r"label column 'label' is empty \(no row has a label\)"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": " "}], None, r"row 2 has an empty label in column 'label'"),
    ([{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}], None,
     r"has no column 'text' \(its columns: label, sentence\); set data.text_column"),
    ([{"text": "a", "intent": "x"}, {"text": "b", "intent": "y"}], None,
     r"has no column 'label' \(its columns: intent, text\); set data.label_column"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], None, r"only one label \('x'\).*at least two"),
    ([{"text": "a", "label": "x"}, {"text": 3, "label": "y"}], None, r"row 2: column 'text' holds a int, not text"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 1.5}], None, r"row 2: label 1.5 .* is a float"),
])
def test_bad_labels_and_columns_are_one_line_errors(tmp_path, rows, eval_rows, message):
    cfg = DataConfig(train=_jsonl(tmp_path / "t.jsonl", rows),
                     eval=_jsonl(tmp_path / "e.jsonl", eval_rows) if eval_rows else None)
    with pytest.raises(DataError, match=message) as e:
        prepare_labelled(cfg)
    assert "\n" not in str(e.value)


def test_a_missing_or_damaged_labels_file_names_the_fix(tmp_path):
    with pytest.raises(AdapterFileError, match="loratune_labels.json is missing.*copy the whole adapter"):
        LabelSet.load(tmp_path)
    (tmp_path / LABELS_NAME).write_text('{"labels": ["only"]}')
    with pytest.raises(AdapterFileError, match="at least two"):
        LabelSet.load(tmp_path)


def test_balanced_weights_equal_scikit_learn():
    utils = pytest.importorskip("sklearn.utils.class_weight")
    import numpy as np

    ids = [0] * 7 + [1] * 2 + [2] * 11
    ref = utils.compute_class_weight("balanced", classes=np.arange(3), y=np.array(ids))
    assert balanced_weights(ids, 3) == pytest.approx(ref.tolist(), rel=1e-12)


def test_intent_task_is_seeded_balanced_and_its_eval_is_held_out(tmp_path):
    assert intent_rows(50, seed=4) == intent_rows(50, seed=4) != intent_rows(50, seed=5)
    train, ev = make_intent_task(tmp_path, n_train=200, n_eval=50)
    tr = [json.loads(line) for line in train.read_text().splitlines()]
    er = [json.loads(line) for line in ev.read_text().splitlines()]
    assert len(tr) == 200 and len(er) == 50 and len({r["text"] for r in tr}) == 200
    assert all(sum(r["label"] == v for r in rows) == len(rows) // len(LABELS) for rows in (tr, er) for v in LABELS)
    assert {r["text"] for r in tr}.isdisjoint(r["text"] for r in er)
    # held-out sentences come from templates training never uses: their fixed words appear in no train row
    held = [t.split("{")[0].strip() for ts in TEMPLATES.values() for t in ts[-HELD_OUT_TEMPLATES:]]
    held = [h for h in held if len(h) > 10]
    assert len(held) >= 5 and not any(h in r["text"] for r in tr for h in held)
    assert sum(any(h in r["text"] for h in held) for r in er) >= len(er) // 4
