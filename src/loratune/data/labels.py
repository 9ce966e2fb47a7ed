"""Labelled text for sequence classification (``task: classification``): rows with a text column (or a text pair)
and a label column, the label set read from the training data, and its file beside the adapter.

Labels are strings or whole numbers. The label set is sorted (numbers by value, text alphabetically), so the
same training labels always give the same ids, whatever the order of the rows: labels 0..K-1 keep their own
numbers as ids. A CSV file holds text only, so ``"1"`` in a CSV and ``1`` in a JSON file are the same label.

Bad input is one ``DataError`` naming the file, the row and the fix: a missing text or label column (with the
columns the file has), an empty label, a label column without any label, only one label, and a label in the eval
data that training never saw (a classifier cannot predict it).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterFileError, DataError
from ..fsutil import save_json
from .readers import read_rows
from .schema import DataConfig

LABELS_NAME = "loratune_labels.json"  # beside the adapter: the label of each class id and the columns read
Label = str | int


@dataclass(frozen=True)
class LabelledRow:
    """One row: its text (and second text, for pairs), its label (None where none is read) and its row number."""

    text: str
    pair: str | None
    label: Label | None
    row: int


@dataclass(frozen=True)
class LabelSet:
    """The classes of a classifier: ``labels[i]`` is class id ``i``'s label; ``columns`` the data columns read
    (text, text pair, label) so that eval and predict read files the way training did."""

    labels: tuple[Label, ...]
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"

    @classmethod
    def from_rows(cls, rows: list[LabelledRow], cfg: DataConfig, where: str) -> LabelSet:
        """The sorted set of the labels of ``rows`` (at least two)."""
        values = {r.label for r in rows}
        if any(isinstance(v, str) for v in values):  # a mix: numbers are read as their text (CSV has only text)
            values = {str(v) for v in values}
        labels = tuple(sorted(values))
        if len(labels) < 2:
            raise DataError(f"{where} has only one label ({labels[0]!r}) in column '{cfg.label_column}'; a "
                            "classifier needs rows of at least two labels")
        return cls(labels, cfg.text_column, cfg.text_pair_column, cfg.label_column)

    @property
    def kind(self) -> str:
        return "int" if all(isinstance(v, int) for v in self.labels) else "str"

    def id2label(self) -> dict[int, str]:
        """transformers' ``config.id2label`` (its labels are text)."""
        return {i: str(v) for i, v in enumerate(self.labels)}

    def ids(self, rows: list[LabelledRow], where: str) -> list[int]:
        """The class id of each row's label; a label training never saw is a DataError naming it."""
        index = {v: i for i, v in enumerate(self.labels)}
        out = []
        for r in rows:
            i = index.get(self._same_kind(r.label))
            if i is None:
                shown = ", ".join(map(repr, self.labels[:10])) + (" ..." if len(self.labels) > 10 else "")
                raise DataError(f"{where} row {r.row} has label {r.label!r}, which training never saw (the "
                                f"adapter's labels: {shown}); a classifier cannot predict it: drop those rows, "
                                "or train with rows of that label")
            out.append(i)
        return out

    def _same_kind(self, value: Label | None) -> Label | None:
        """``value`` as this set's labels are stored: "3" for 3 in a text set, 3 for "3" in a number set."""
        if self.kind == "str" and isinstance(value, int):
            return str(value)
        if self.kind == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        return value

    def save(self, directory: str | Path) -> None:
        """Write ``loratune_labels.json`` into ``directory``."""
        save_json({"labels": list(self.labels), "text_column": self.text_column,
                   "text_pair_column": self.text_pair_column, "label_column": self.label_column},
                  Path(directory) / LABELS_NAME)

    @classmethod
    def load(cls, directory: str | Path) -> LabelSet:
        """The label set saved beside a classification adapter (an AdapterFileError if missing or damaged)."""
        path = Path(directory) / LABELS_NAME
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AdapterFileError(f"{path} is missing: this classification adapter does not say which label each "
                                   "class is; copy the whole adapter directory `loratune train` wrote") from None
        except (OSError, ValueError) as e:
            raise AdapterFileError(f"{path} is damaged ({e}); copy the adapter directory again") from None
        labels = d.get("labels") if isinstance(d, dict) else None
        if not isinstance(labels, list) or len(labels) < 2 or not all(
                isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in labels):
            raise AdapterFileError(f"{path}: 'labels' must be a list of at least two strings or whole numbers; "
                                   "copy the adapter directory again")
        cols = {k: d.get(k) for k in ("text_column", "text_pair_column", "label_column") if d.get(k) is not None}
        return cls(tuple(labels), **cols)


def read_labelled(path: str, cfg: DataConfig | LabelSet, what: str, labels: bool = True) -> list[LabelledRow]:
    """The rows of ``path`` as text (pair) and label, checked: every row has text, and a label unless ``labels`` is
    False (predict reads text only). ``cfg`` names the columns (a run's data section, or a saved label set)."""
    rows = read_rows(path, what)
    where = f"{what} {path}"
    _require_column(rows, cfg.text_column, where, "data.text_column")
    if cfg.text_pair_column:
        _require_column(rows, cfg.text_pair_column, where, "data.text_pair_column")
    if labels:
        _require_column(rows, cfg.label_column, where, "data.label_column")
        if all(_empty(r.get(cfg.label_column)) for r in rows):
            raise DataError(f"{where}: label column '{cfg.label_column}' is empty (no row has a label); fill it, or "
                            "set data.label_column to the column that holds the labels")
    out = []
    for n, r in enumerate(rows, 1):
        text = _text(r, cfg.text_column, n, where)
        pair = _text(r, cfg.text_pair_column, n, where) if cfg.text_pair_column else None
        out.append(LabelledRow(text, pair, _label(r.get(cfg.label_column), cfg.label_column, n, where)
                               if labels else None, n))
    return out


def _require_column(rows: list[dict[str, Any]], column: str, where: str, key: str) -> None:
    if not any(column in r for r in rows):
        columns = sorted({k for r in rows[:100] for k in r})
        raise DataError(f"{where} has no column '{column}' (its columns: {', '.join(columns) or 'none'}); set "
                        f"{key} to the column to read")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(row: dict[str, Any], column: str, n: int, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        got = "nothing" if _empty(value) else f"a {type(value).__name__}"
        raise DataError(f"{where} row {n}: column '{column}' holds {got}, not text; give every row its text, or "
                        "drop the row")
    return value.strip()


def _label(value: Any, column: str, n: int, where: str) -> Label:
    if _empty(value):
        raise DataError(f"{where} row {n} has an empty label in column '{column}'; give it a label, or drop the row")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where} row {n}: label {value!r} in column '{column}' is a {type(value).__name__}; labels "
                        "are text or whole numbers")
    return value.strip() if isinstance(value, str) else value


@dataclass
class LabelledData:
    """Training and held-out rows with their class ids, the label set and the preparation report."""

    train: list[LabelledRow]
    train_ids: list[int]
    eval: list[LabelledRow]
    eval_ids: list[int]
    labels: LabelSet
    report: list[str]


def prepare_labelled(cfg: DataConfig, seed: int = 0) -> LabelledData:
    """Read ``cfg.train`` (and ``cfg.eval``, or hold out ``cfg.eval_split`` of train by ``seed``), build the label
    set from the training rows and give every row its class id; the report counts rows per label."""
    if cfg.eval and cfg.eval_split:
        raise DataError("data.eval and data.eval_split are both set; keep the eval file or the split")
    train = read_labelled(cfg.train, cfg, "train file")
    evals = read_labelled(cfg.eval, cfg, "eval file") if cfg.eval else []
    report = [f"train: rows read: {len(train)}"]
    if cfg.eval_split:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        k = min(max(1, round(len(train) * cfg.eval_split)), len(train) - 1)
        held = set(order[:k])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        report.append(f"eval: rows held out of train (eval_split={cfg.eval_split}, seed={seed}): {len(evals)}")
    labels = LabelSet.from_rows(train, cfg, f"train file {cfg.train}")
    train_ids = labels.ids(train, f"train file {cfg.train}")
    eval_ids = labels.ids(evals, f"eval file {cfg.eval}" if cfg.eval else f"train file {cfg.train} (held out)")
    counts = Counter(train_ids)
    report.append(f"labels: {len(labels.labels)} (" + ", ".join(f"{v}: {counts[i]}" for i, v in
                                                            enumerate(labels.labels)) + " train rows)")
    report.append(f"eval: rows: {len(evals)}")
    return LabelledData(train, train_ids, evals, eval_ids, labels, report)


def balanced_weights(ids: list[int], k: int) -> list[float]:
    """scikit-learn's ``class_weight="balanced"``: n / (k × count) per class (a class without rows gets 1)."""
    counts = Counter(ids)
    return [len(ids) / (k * counts[c]) if counts[c] else 1.0 for c in range(k)]
