"""Data preparation, end to end: read local files, clean them, template them into token ids with loss masks.

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

import random

from ..errors import DataError
from .batches import pack
from .clean import clean_rows, detect_format, norm_key
from .readers import read_rows
from .schema import IGNORE, DataConfig, Example, PreparedData, Row, Step
from .tokenize import tokenize_all


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


AUTO_SHARE, AUTO_MIN, AUTO_MAX, AUTO_FEWEST = 0.1, 32, 500, 100


def held_out_count(n_rows: int) -> int:
    """How many of ``n_rows`` cleaned train rows ``eval_split: auto`` holds out: 10 %, at least 32 (a few dozen, so
    that an eval loss is not one row's noise), at most 500 (evaluation stays cheap) and never more than a fifth of
    the data; none below 100 rows, where every row is worth more as training data than a 20-row eval set."""
    if n_rows < AUTO_FEWEST:
        return 0
    return min(max(AUTO_MIN, round(n_rows * AUTO_SHARE)), AUTO_MAX, n_rows // 5)


def _load(path: str, fmt: str, label: str, report: list[Step]) -> tuple[list[Row], str]:
    """The cleaned rows of one file (at least one) and their format; ``label`` is ``train`` or ``eval``."""
    rows = read_rows(path, f"{label} file")
    if fmt == "auto":
        try:
            fmt = detect_format(rows)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    return clean_rows(rows, fmt, label, path, report), fmt


def prepare(cfg: DataConfig, tokenizer, seed: int = 0) -> PreparedData:
    """Read, clean, split, tokenize (and pack) the train and eval data of ``cfg``, reporting each step."""
    if cfg.eval and cfg.eval_split and cfg.eval_split != "auto":
        raise DataError("data.eval and data.eval_split are both set; keep the eval file or the split")
    report: list[Step] = []
    train, fmt = _load(cfg.train, cfg.format, "train", report)
    evals: list[Row] = []
    eval_fmt = fmt
    if cfg.eval:
        evals, eval_fmt = _load(cfg.eval, cfg.format, "eval", report)
        held = {norm_key(m) for _, m in evals}
        before = len(train)
        train = [(n, m) for n, m in train if norm_key(m) not in held]
        report.append(Step("train: rows also in the eval set removed (leakage)", before - len(train)))
    elif cfg.eval_split == "auto":
        k = held_out_count(len(train))
        if k:
            train, evals = split_rows(train, k / len(train), seed)
            report.append(Step(f"eval: rows held out of train (eval_split=auto: no eval file, 10 % held out, "
                               f"at least {AUTO_MIN}, at most {AUTO_MAX} and a fifth of the rows, seed={seed})",
                               len(evals)))
        else:
            report.append(Step(f"eval: none held out (eval_split=auto: no eval file, and fewer than {AUTO_FEWEST} "
                               "cleaned rows: all of them train; give data.eval for an eval loss)", 0))
    elif cfg.eval_split:
        train, evals = split_rows(train, cfg.eval_split, seed)
        report.append(Step(f"eval: rows held out of train (eval_split={cfg.eval_split}, seed={seed})",
                           len(evals)))
    if not train:
        raise DataError(f"no train rows left after cleaning {cfg.train}; every row was also in the eval set "
                        "or was dropped — see the report")
    train_ex = tokenize_all(tokenizer, train, cfg, fmt, "train", report)
    if not train_ex:
        raise DataError(f"no train rows left after tokenizing {cfg.train}: all exceed max_seq_len="
                        f"{cfg.max_seq_len}; raise data.max_seq_len or set data.overlength=truncate")
    eval_ex = tokenize_all(tokenizer, evals, cfg, eval_fmt, "eval", report) if evals else []
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
    examples = tokenize_all(tokenizer, convs, cfg, fmt, "eval", report)
    if not examples:
        raise DataError(f"no rows of {cfg.train} fit max_seq_len={cfg.max_seq_len}; raise it")
    return examples, report
