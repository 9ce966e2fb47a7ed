"""Issue 20, the command line: bad inputs end in one short error and exit code 2, and no user file is lost."""

from __future__ import annotations

import json
import math
import os

import pytest

from loratune.cli import main
from loratune.fsutil import read_tensors, save_tensors


def _args(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}", f"output_dir={out}",
            "train.max_steps=2", "train.batch_size=4", "lora.r=4", "data.max_seq_len=64", *extra]


@pytest.fixture(scope="module")
def adapter(tiny_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    (out / "run.yaml").write_text("{}\n")
    assert main(["train", str(out / "run.yaml"), *_args(tiny_dir, data_files, out), "--no-progress"]) == 0
    return out / "adapter"


def _copy(adapter, tmp_path):
    import shutil

    return shutil.copytree(adapter, tmp_path / "ad")


def _fails(capsys, argv, *words) -> str:
    """Exit code 2, at most three lines on stderr, no traceback, and the words in the message."""
    with pytest.raises(SystemExit) if argv[0] == "argparse" else _nothing():
        code = main(argv[1:] if argv[0] == "argparse" else argv)
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and 1 <= len(err.splitlines()) <= 3, err
    for w in words:
        assert w in err, (w, err)
    return err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_merge_never_replaces_what_loratune_did_not_write(capsys, adapter, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    _fails(capsys, ["merge", "--adapter", str(adapter), "--out", str(mine)], "was not written by loratune merge",
           "--overwrite")
    assert (mine / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(mine)
    _fails(capsys, ["merge", "--adapter", str(adapter), "--out", "."], "must not be replaced")
    _fails(capsys, ["merge", "--adapter", str(adapter), "--out", "notes.txt"], "is a file")
    _fails(capsys, ["merge", "--adapter", str(adapter), "--out", str(adapter.parent)], "must not be replaced")
    assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0  # its own earlier output: replaced
    assert main(["merge", "--adapter", str(adapter), "--out", str(mine), "--overwrite"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left behind


def test_eval_json_is_valid_even_when_a_metric_is_not_finite(capsys, adapter, data_files, monkeypatch):
    monkeypatch.setattr("loratune.cli.infer.eval_loss",
                        lambda *a, **k: {"loss": math.nan, "perplexity": math.inf, "tokens": 0})
    assert main(["eval", "--adapter", str(adapter), "--data", str(data_files[1]), "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert rows["adapter"]["loss"] is None and rows["adapter"]["perplexity"] is None


def test_an_adapter_with_nan_weights_is_refused_at_load(capsys, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    tensors = read_tensors(ad / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * math.nan
    save_tensors(tensors, ad / "adapter_model.safetensors")
    _fails(capsys, ["generate", "--adapter", str(ad), "hello"], "holds NaN or infinite values", key)


def test_damaged_files_beside_an_adapter_are_one_error(capsys, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    (ad / "loratune_prompt.json").write_text("{not json")
    _fails(capsys, ["generate", "--adapter", str(ad), "hi"], "loratune_prompt.json is damaged", "--system-prompt")
    (ad / "loratune_prompt.json").write_text('{"system_prompt": null}')
    (ad / "tokenizer_config.json").write_bytes(b"\xff\xfe\x00garbage")
    _fails(capsys, ["generate", "--adapter", str(ad), "hi"], "tokenizer saved in", "cannot be read")


BATTERY = [
    (["argparse", "eval", "--data", "x.jsonl", "--batch-size", "0"], ["must be a whole number ≥ 1"]),
    (["argparse", "generate", "hi", "--max-new-tokens", "-1"], ["must be a whole number ≥ 1"]),
    (["train", "{tmp}/bin.yaml"], ["not a text file"]),
    (["train", "{tmp}"], ["is a directory"]),
    (["train", "{cfg}", "train.max_grad_norm=-1"], ["max_grad_norm"]),
    (["train", "{cfg}", "train.weight_decay=-5"], ["weight_decay"]),
    (["train", "{cfg}", "train.lr=.nan"], ["train.lr must be a finite number"]),
    (["train", "{cfg}", "train.epochs=.inf"], ["train.epochs must be a finite number"]),
    (["train", "{cfg}", "lora.target_modules=(q_proj"], ["not a valid regular expression"]),
    (["train", "{cfg}", "lora.rank_pattern={{'q_proj(': 2}}"], ["not a valid regular expression"]),
    (["train", "{cfg}", "lora.modules_to_save=[foo_head]"], ["matched no module"]),
    (["train", "{cfg}", "output_dir={tmp}/afile"], ["is a file"]),
    (["train", "{cfg}", "output_dir={tmp}/afile", "--dry-run"], ["is a file"]),
    (["train", "{cfg}", "output_dir=/proc/loratune"], ["cannot be written"]),
    (["train", "{cfg}", "data.chat_template={tmp}/none.jinja"], ["neither a Jinja template"]),
    (["merge", "--adapter", "{tmp}/afile", "--out", "{tmp}/m"], ["is a file"]),
    (["quickstart", "--out", "{tmp}/afile"], ["is a file"]),
    (["quickstart", "--out", "{tmp}"], ["is not empty"]),
    (["eval", "--adapter", "{tmp}/afile", "--data", "{data}"], ["is a file"]),
]


@pytest.mark.parametrize("argv, words", BATTERY, ids=[" ".join(a[:3]) for a, _ in BATTERY])
def test_bad_input_battery(capsys, tmp_path, tiny_dir, data_files, argv, words):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x01binary")
    (tmp_path / "afile").write_text("mine")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": str(tiny_dir), "data": {"train": str(data_files[0])},
                               "output_dir": str(tmp_path / "out"), "train": {"max_steps": 1}}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = [a.format(tmp=tmp_path, cfg=cfg, data=data_files[1]) for a in argv]
    _fails(capsys, argv, *words)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # every user file intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # and no temp left behind


def test_ctrl_c_during_train_says_how_to_resume(monkeypatch, capsys, tmp_path):
    import loratune.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_command", lambda name: interrupted)
    (tmp_path / "run.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "run.yaml")]) == 130
    assert "interrupted (the same command resumes from the last checkpoint" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
