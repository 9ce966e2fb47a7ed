"""The built-in dates task: deterministic, disjoint splits, answers that match the written dates."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from loratune.data.dates_task import PROMPT, SURFACES, dates_rows, make_dates_task, ordinal

# An independent reader of the written forms (not the generator's tables).
WORD_DAYS = {w: i for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth fourteenth "
    "fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split(), 1)}
WORD_DAYS.update({f"twenty-{w}": 20 + i for w, i in WORD_DAYS.items() if i < 10})
WORD_DAYS.update({"thirtieth": 30, "thirty-first": 31})


def parse_written(text: str) -> dt.date:
    if text.endswith(" (US)"):
        return dt.datetime.strptime(text[:-5], "%m/%d/%Y").date()
    m = re.fullmatch(r"the ([a-z-]+) of (\w+), (\d{4})", text)
    if m:
        return dt.datetime.strptime(f"{WORD_DAYS[m[1]]} {m[2]} {m[3]}", "%d %B %Y").date()
    text = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", text)
    for fmt in ("%B %d, %Y", "%d %B %Y", "%b %d, %Y", "%A, %B %d, %Y"):
        try:
            d = dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
        if fmt.startswith("%A"):  # the weekday must be the right one
            assert text.split(",")[0] == d.strftime("%A")
        return d
    raise AssertionError(f"cannot parse {text!r}")


def test_rows_are_deterministic():
    assert dates_rows(50, seed=1) == dates_rows(50, seed=1)
    assert dates_rows(50, seed=1) != dates_rows(50, seed=2)


def test_answers_are_the_written_dates_in_iso():
    prefix = PROMPT.format("")
    for row in dates_rows(500, seed=0):
        assert row["prompt"].startswith(prefix)
        written = row["prompt"][len(prefix):]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["completion"])
        assert parse_written(written).isoformat() == row["completion"], row


SHAPES = {
    "month_day_year": r"[A-Z][a-z]+ \d{1,2}, \d{4}",
    "month_ordinal_year": r"[A-Z][a-z]+ \d{1,2}(st|nd|rd|th), \d{4}",
    "day_month_year": r"\d{1,2} [A-Z][a-z]+ \d{4}",
    "abbrev_month": r"[A-Z][a-z]{2} \d{1,2}, \d{4}",
    "words": r"the [a-z-]+ of [A-Z][a-z]+, \d{4}",
    "us_numeric": r"\d\d/\d\d/\d{4} \(US\)",
    "weekday": r"[A-Z][a-z]+day, [A-Z][a-z]+ \d{1,2}, \d{4}",
}


def test_every_surface_form_is_used_and_prompts_are_short():
    assert set(SHAPES) == set(SURFACES)
    written = [r["prompt"][len(PROMPT.format("")):] for r in dates_rows(700, seed=0)]
    for name, shape in SHAPES.items():
        assert any(re.fullmatch(shape, w) for w in written), name
    assert max(len(w) for w in written) < 50
    assert len(set(dates_rows(700, seed=0)[i]["completion"] for i in range(700))) == 700  # distinct dates


def test_ordinal():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 30, 31)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "30th", "31st"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_dates_task_splits_do_not_overlap(tmp_path):
    train, evals = make_dates_task(tmp_path / "data", n_train=300, n_eval=60, seed=0)
    tr, ev = read(train), read(evals)
    assert (len(tr), len(ev)) == (300, 60)
    assert not {r["completion"] for r in tr} & {r["completion"] for r in ev}  # no eval date in train at all
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in ev}
    train2, evals2 = make_dates_task(tmp_path / "again", n_train=300, n_eval=60, seed=0)
    assert train2.read_text() == train.read_text() and evals2.read_text() == evals.read_text()


def test_make_dates_task_messages_format(tmp_path):
    train, _ = make_dates_task(tmp_path, n_train=5, n_eval=2, fmt="messages")
    row = read(train)[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][1]["content"] == dates_rows(7, 0)[0]["completion"]
    with pytest.raises(ValueError, match="fmt"):
        make_dates_task(tmp_path, fmt="csv")
