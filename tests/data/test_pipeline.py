"""Data preparation with the real SmolLM2 tokenizer: formats, cleaning, masking, packing, collate, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from loratune.data import (
    DataConfig,
    Example,
    collate,
    detect_format,
    format_example,
    pack,
    prepare,
    prepare_eval,
    read_rows,
    split_rows,
    to_messages,
)
from loratune.errors import DataError

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from loratune.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pc(i: int) -> dict:
    return {"prompt": f"question number {i}?", "completion": f"answer {i}"}


def count(data, fragment: str) -> int:
    hits = [s for s in data.report if fragment in s.name]
    assert len(hits) == 1, (fragment, [s.name for s in data.report])
    return hits[0].count


def trained(ex: Example) -> list[int]:
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"text": "plain"}, "text"),
])
def test_detect_format(row, fmt):
    assert detect_format([row]) == fmt
    assert to_messages(row, fmt, 1)[-1]["role"] == "assistant"


def test_detect_format_unknown_keys():
    with pytest.raises(DataError, match="cannot detect.*data.format"):
        detect_format([{"question": "q", "answer": "a"}])


def test_to_messages_conversions():
    assert to_messages({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca", 1) == [
        {"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"instruction": "Hi", "output": "Yo"}, "alpaca", 1)[0]["content"] == "Hi"
    conv = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": " u "},
                              {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in to_messages(conv, "sharegpt", 1)] == ["system", "user", "assistant"]
    assert to_messages(conv, "sharegpt", 1)[1]["content"] == "u"
    assert to_messages({"text": " t "}, "text", 1) == [{"role": "assistant", "content": "t"}]


def test_to_messages_errors_name_row_and_keys():
    with pytest.raises(DataError, match=r"row 7 has no 'completion'"):
        to_messages({"prompt": "p"}, "prompt_completion", 7)
    with pytest.raises(DataError, match=r"row 3: messages\[1\] has role 'bot'"):
        to_messages({"messages": [{"role": "bot", "content": "x"}]}, "messages", 3)
    with pytest.raises(DataError, match="unknown data format 'alpacca'.*did you mean 'alpaca'"):
        to_messages({}, "alpacca", 1)


def test_unknown_format_in_config_lists_valid_ones():
    with pytest.raises(DataError, match="prompt_completion, alpaca, messages, sharegpt, text"):
        DataConfig(train="x", format="chatml")
    with pytest.raises(DataError, match="overlength"):
        DataConfig(train="x", overlength="cut")
    with pytest.raises(DataError, match="eval_split"):
        DataConfig(train="x", eval_split=1.5)


# ---------------------------------------------------------------- reading


def test_read_jsonl_keeps_iso_date_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "2021-03-05"}])
    assert read_rows(path) == [{"prompt": "p", "completion": "2021-03-05"}]


def test_txt_file_refused_with_how_to_convert(tmp_path):
    (tmp_path / "d.txt").write_text("one example\nanother\n")
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "d.txt")
    msg = str(e.value)
    assert "d.txt has unsupported extension '.txt'" in msg
    assert '.jsonl file with one JSON object per line, {"text": "..."}, for data.format=text' in msg
    assert "supported: .jsonl, .json, .csv, .parquet" in msg


@pytest.mark.parametrize("name, content, state", [
    ("e.jsonl", "", "is empty: it has no rows"),
    ("e.jsonl", "\n  \n", "is empty: it has no rows"),
    ("e.json", "", "is empty: it has no rows"),
    ("e.json", "[]", "has no rows (an empty JSON list)"),
    ("e.csv", "", "is empty: it has no rows"),
    ("e.csv", "prompt,completion\n", "has no rows (only a header line)"),
])
def test_empty_files_say_so(tmp_path, name, content, state):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"data file .*{name} {re.escape(state)}; add rows"):
        read_rows(tmp_path / name)


@pytest.mark.parametrize("fmt", ["auto", "prompt_completion"])
def test_empty_train_or_eval_file_is_named(tmp_path, tok, fmt):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", [pc(1), pc(2)])
    with pytest.raises(DataError, match=r"train file .*empty\.jsonl is empty: it has no rows"):
        prepare(DataConfig(train=str(empty), format=fmt), tok)
    with pytest.raises(DataError, match=r"eval file .*empty\.jsonl is empty: it has no rows"):
        prepare(DataConfig(train=good, eval=str(empty), format=fmt), tok)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match=r"eval file .*list\.json has no rows \(an empty JSON list\)"):
        prepare(DataConfig(train=good, eval=str(tmp_path / "list.json"), format=fmt), tok)


def test_undetectable_format_names_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"qa\.jsonl: cannot detect the data format from keys \['answer', 'question'\]"):
        prepare(DataConfig(train=path), tok)
    with pytest.raises(DataError, match="no rows"):
        detect_format([])


def test_read_json_array_csv_parquet(tmp_path):
    rows = [{"prompt": "a", "completion": "007"}, {"prompt": "b", "completion": "2021-03-05"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_rows(tmp_path / "d.json") == rows
    (tmp_path / "d.csv").write_text("prompt,completion\na,007\nb,2021-03-05\n")
    assert read_rows(tmp_path / "d.csv") == rows
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_rows(tmp_path / "d.parquet") == rows


def test_read_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; check the path"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "adir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"adir.jsonl is a directory, but a data file is expected "
                                        r"\(\.jsonl, \.json, \.csv, \.parquet\)"):
        read_rows(tmp_path / "adir.jsonl")
    (tmp_path / "noext").write_text("x")
    with pytest.raises(DataError, match="noext has no extension.*.jsonl"):
        read_rows(tmp_path / "noext")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported extension '\.txt'.*\.jsonl"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\nnot json\n')
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 not a JSON object"):
        read_rows(tmp_path / "list.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot read .*bad.parquet"):
        read_rows(tmp_path / "bad.parquet")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        read_rows(tmp_path / "bin.jsonl")


# ---------------------------------------------------------------- cleaning


def test_cleaning_counts(tmp_path, tok):
    rows = [pc(1), pc(2), pc(3), pc(1),  # row 4: exact duplicate of row 1
            {"prompt": "  QUESTION   number 2? ", "completion": "Answer 2 "},  # row 5: near duplicate of 2
            {"prompt": "empty answer", "completion": "   "},  # row 6: empty
            {"prompt": "number", "completion": 5},  # row 7: malformed
            {"prompt": " spaced ", "completion": " out "}]  # row 8: stripped
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tok)
    assert data.format == "prompt_completion"
    assert count(data, "train: rows read") == 8
    assert count(data, "whitespace stripped") == 2
    assert count(data, "empty or malformed") == 2
    detail = next(s.detail for s in data.report if "malformed" in s.name)
    assert "row 6: empty 'completion'" in detail and "row 7: 'completion' is int" in detail
    assert count(data, "exact duplicates") == 1
    assert count(data, "near duplicates") == 1
    assert len(data.train) == 4 and data.eval == []
    assert any("examples ready: 4" in line for line in data.report_lines())


def test_rows_missing_keys_are_an_error_naming_rows(tmp_path, tok):
    rows = [pc(1), {"prompt": "only a prompt"}, pc(3), {"completion": "x"}]
    with pytest.raises(DataError, match=r"row 2 lacks 'completion'; row 4 lacks 'prompt' .*set data.format"):
        prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tok)


def test_missing_keys_reported_per_row_grouped_and_capped(tmp_path, tok):
    rows = [pc(i) for i in range(8)] + [{"prompt": "only prompt"}, {"question": "q", "answer": "a"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError) as e:
        prepare(DataConfig(train=path), tok)
    msg = str(e.value)
    assert "t.jsonl: row 9 lacks 'completion'; row 10 lacks 'prompt', 'completion'" in msg and "\n" not in msg
    rows = [{"prompt": "p"}] * 7 + [{"completion": "c"}, {"a": 1}, {"b": 1}, {"c": 1}, pc(1)]
    with pytest.raises(DataError) as e:
        prepare(DataConfig(train=write_jsonl(tmp_path / "m.jsonl", rows), format="prompt_completion"), tok)
    msg = str(e.value)
    assert "rows 1, 2, 3, 4, 5 and 2 more lack 'completion'; row 8 lacks 'prompt'; " \
           "rows 9, 10, 11 lack 'prompt', 'completion' (format prompt_completion)" in msg


def test_empty_after_cleaning(tmp_path, tok):
    rows = [{"prompt": "a", "completion": ""}, {"prompt": " ", "completion": "b"}]
    with pytest.raises(DataError, match="no usable rows after cleaning"):
        prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tok)


def test_all_rows_dropped_error_gives_reasons_and_rows(tmp_path, tok):
    rows = [{"prompt": "", "completion": ""}] * 10 + [{"prompt": "p", "completion": 5}]
    with pytest.raises(DataError) as e:
        prepare(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows)), tok)
    msg = str(e.value)
    assert "t.jsonl has no usable rows after cleaning (11 read, all dropped)" in msg
    assert "10 rows dropped (rows 1, 2, 3, 4, 5 and 5 more): empty 'prompt', 'completion'" in msg
    assert "1 row dropped (row 11): 'completion' is int, not a string" in msg and "\n" not in msg


def test_leakage_removed(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [pc(i) for i in range(6)])
    evals = write_jsonl(tmp_path / "e.jsonl", [pc(1), {"prompt": "QUESTION number 4?",
                                                       "completion": "answer 4"}])
    data = prepare(DataConfig(train=train, eval=evals), tok)
    assert count(data, "leakage") == 2
    assert len(data.train) == 4 and len(data.eval) == 2
    assert [e.reference for e in data.eval] == ["answer 1", "answer 4"]


def test_everything_leaked_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(1)])
    with pytest.raises(DataError, match="no train rows left"):
        prepare(DataConfig(train=path, eval=path), tok)


def test_eval_split_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(i) for i in range(20)])
    a = prepare(DataConfig(train=path, eval_split=0.25), tok, seed=3)
    b = prepare(DataConfig(train=path, eval_split=0.25), tok, seed=3)
    c = prepare(DataConfig(train=path, eval_split=0.25), tok, seed=4)
    assert len(a.train) == 15 and len(a.eval) == 5
    assert [e.reference for e in a.eval] == [e.reference for e in b.eval]
    assert [e.reference for e in a.eval] != [e.reference for e in c.eval]
    assert not {e.reference for e in a.eval} & {tok.decode(trained(e)) for e in a.train}
    assert split_rows(list(range(3)), 0.01)[1] != []  # at least one held out
    with pytest.raises(DataError, match="both set"):
        prepare(DataConfig(train=path, eval=path, eval_split=0.1), tok)


# ---------------------------------------------------------------- templating and masking


def test_masking_prompt_completion(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Convert: March 5th, 2021",
                                                      "completion": "2021-03-05"}])
    ex = prepare(DataConfig(train=path), tok).train[0]
    end = tok.convert_tokens_to_ids(IM_END)
    n = len(ex.prompt_ids)
    assert ex.input_ids[:n] == ex.prompt_ids
    assert tok.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")
    assert all(v == -100 for v in ex.labels[:n])
    assert ex.labels[n] != -100  # the first response token is trained
    assert tok.decode(trained(ex)) == "2021-03-05" + IM_END
    last = max(i for i, v in enumerate(ex.labels) if v != -100)
    assert ex.input_ids[last] == end and ex.labels[last] == end
    assert all(v == -100 for v in ex.labels[last + 1:])  # the template's trailing newline
    assert ex.reference == "2021-03-05"
    assert "[[2021-03-05<|im_end|>]]" in format_example(tok, ex)


def test_system_prompt_and_multi_turn(tmp_path, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "date?"}, {"role": "assistant", "content": "2020-01-01"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": msgs}])
    ex = prepare(DataConfig(train=path, system_prompt="Be brief."), tok).train[0]
    text = format_example(tok, ex)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert text.count("[[") == 2
    assert "[[hello there<|im_end|>]]" in text and "[[2020-01-01<|im_end|>]]" in text
    assert "SmolLM" not in text  # the template's default system prompt is replaced
    assert ex.reference == "2020-01-01"


def test_train_on_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(1)])
    ex = prepare(DataConfig(train=path, train_on_prompt=True), tok).train[0]
    assert ex.labels == ex.input_ids


def test_text_format_trains_everything_without_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time"}])
    data = prepare(DataConfig(train=path), tok)
    ex = data.train[0]
    assert data.format == "text"
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[:-1]) == "Once upon a time"
    assert "<|im_start|>" not in tok.decode(ex.input_ids)


def test_custom_chat_template_and_missing_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(1)])
    tpl = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
          "{% if add_generation_prompt %}assistant:{% endif %}"
    ex = prepare(DataConfig(train=path, chat_template=tpl), tok).train[0]
    assert tok.decode(trained(ex)) == " answer 1" + tok.eos_token  # EOS appended where the template has none
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(DataError, match="no chat template; set data.chat_template"):
            prepare(DataConfig(train=path), tok)
    finally:
        tok.chat_template = saved


def test_all_labels_masked_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(1), pc(2)])
    with pytest.raises(DataError, match="every label is masked"):
        prepare(DataConfig(train=path, max_seq_len=10, overlength="truncate"), tok)
    users_only = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(DataError, match="every label is masked"):
        prepare(DataConfig(train=path, chat_template=users_only), tok)


def test_overlength_drop_and_truncate(tmp_path, tok):
    rows = [pc(1), {"prompt": "long " * 200, "completion": "x"},
            {"prompt": "short", "completion": "y " * 200}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dropped = prepare(DataConfig(train=path, max_seq_len=64), tok)
    assert count(dropped, "max_seq_len=64 tokens dropped") == 2 and len(dropped.train) == 1
    cut = prepare(DataConfig(train=path, max_seq_len=64, overlength="truncate"), tok)
    assert count(cut, "truncated") == 2
    assert count(cut, "no trained tokens left") == 1  # the long prompt lost its whole response
    assert len(cut.train) == 2 and all(len(e.input_ids) <= 64 for e in cut.train)
    with pytest.raises(DataError, match="all exceed max_seq_len.*overlength=truncate"):
        prepare(DataConfig(train=write_jsonl(tmp_path / "l.jsonl", rows[1:]), max_seq_len=64), tok)


# ---------------------------------------------------------------- packing and batches


def test_packing(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(i) for i in range(10)])
    plain = prepare(DataConfig(train=path, max_seq_len=128), tok).train
    packed = prepare(DataConfig(train=path, max_seq_len=128, packing=True), tok).train
    assert 1 < len(packed) < len(plain)
    assert all(len(e.input_ids) <= 128 for e in packed)
    assert [t for e in packed for t in e.input_ids] == [t for e in plain for t in e.input_ids]
    assert sum(len(trained(e)) for e in packed) == sum(len(trained(e)) for e in plain)
    first = packed[0]
    starts = [i for i, p in enumerate(first.position_ids) if p == 0]
    assert len(starts) > 1 and starts[1] == len(plain[0].input_ids)
    assert all(first.labels[s] == -100 for s in starts)
    # a trained first token must not be predicted across the boundary
    assert pack([Example([1, 2], [1, 2]), Example([3, 4], [3, 4])], 8)[0].labels == [-100, 2, -100, 4]


def test_collate_pads_right():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert "position_ids" not in batch and batch["input_ids"].dtype == torch.long
    packed = collate([Example([1, 2, 3], [1, 2, 3], position_ids=[0, 0, 1]), Example([4], [4])], pad_id=9)
    assert packed["position_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert packed["input_ids"].tolist()[1] == [4, 9, 9]


def test_collate_real_batch_runs_through_prepare(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(1), {"prompt": "a longer question " * 3,
                                                             "completion": "z"}])
    data = prepare(DataConfig(train=path), tok)
    batch = collate(data.train, tok.pad_token_id)
    short = min(range(2), key=lambda i: len(data.train[i].input_ids))
    pad_len = batch["input_ids"].shape[1] - len(data.train[short].input_ids)
    assert pad_len > 0
    assert batch["input_ids"][short, -pad_len:].eq(tok.pad_token_id).all()
    assert batch["labels"][short, -pad_len:].eq(-100).all()


def test_prepare_eval_gives_prompts_and_references(tmp_path, tok):
    path = write_jsonl(tmp_path / "e.jsonl", [pc(1), pc(2)])
    examples, report = prepare_eval(DataConfig(train=path), tok)
    assert [e.reference for e in examples] == ["answer 1", "answer 2"]
    prompt = tok.decode(examples[0].prompt_ids)
    assert prompt.endswith("question number 1?<|im_end|>\n<|im_start|>assistant\n")
    assert report[0].count == 2


def test_dates_task_prepares(tmp_path, tok):
    from loratune.data.dates_task import make_dates_task

    train, evals = make_dates_task(tmp_path, n_train=40, n_eval=10)
    data = prepare(DataConfig(train=str(train), eval=str(evals), max_seq_len=96), tok)
    assert len(data.train) == 40 and len(data.eval) == 10 and count(data, "leakage") == 0
    assert all(tok.decode(trained(e)).endswith(IM_END) for e in data.train)


def test_rows_the_template_rejects_are_reported_with_row_numbers(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [pc(1), {"prompt": "bad", "completion": "x"}, pc(3)])
    tpl = "{% for m in messages %}{% if m.content == 'bad' %}{{ raise_exception('no bad') }}{% endif %}" \
          "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    data = prepare(DataConfig(train=path, chat_template=tpl), tok)
    assert count(data, "template rejected") == 1 and len(data.train) == 2
    assert "row 2: no bad" in next(s.detail for s in data.report if "rejected" in s.name)
