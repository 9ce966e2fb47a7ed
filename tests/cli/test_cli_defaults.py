"""``loratune train --dry-run`` shows the plan of the automatic defaults: the search grid and its cost, the steps,
the evaluations, the estimated time; given values are shown as given."""

from __future__ import annotations

import json

from loratune.cli import main


def _args(tiny_dir, train_f, out, *extra):
    return [f"model={tiny_dir}", f"data.train={train_f}", f"output_dir={out}", "train.batch_size=8", "lora.r=4",
            "data.max_seq_len=64", *extra]


def _rows(path, n):
    path.write_text("".join(json.dumps({"prompt": f"Say {i} twice.", "completion": f"{i} {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_dry_run_shows_the_automatic_plan(capsys, tiny_dir, tmp_path):
    train_f = _rows(tmp_path / "t.jsonl", 400)
    f = tmp_path / "run.yaml"
    f.write_text("{}\n")
    assert main(["train", str(f), *_args(tiny_dir, train_f, tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr: auto" in out and "eval_split: auto" in out  # the resolved config says auto
    assert "eval: rows held out of train (eval_split=auto" in out and "eval: examples ready: 40" in out
    # 360 train rows × 3 passes = 1080 row-passes at 8 a step: 135 steps, evaluated every 14
    assert "# plan" in out and "length: epochs auto: 135 steps (3 passes over 360 rows" in out
    assert "lr: auto: a search on the training data before the run: rates 5.0e-05…5.0e-03" in out
    assert "evaluation: on 40 rows every 14 steps and at the end; early stopping after 3 evaluations" in out
    assert "estimated lr search time" in out and "estimated training time on this machine" in out
    assert not (tmp_path / "o").exists()


def test_dry_run_shows_given_values_and_a_search_too_short_to_run(capsys, tiny_dir, tmp_path):
    train_f = _rows(tmp_path / "t.jsonl", 50)
    f = tmp_path / "run.yaml"
    f.write_text("{}\n")
    assert main(["train", str(f), *_args(tiny_dir, train_f, tmp_path / "o", "train.max_steps=10"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr: auto: a run of 10 steps is too short to search" in out and "using lr=0.0002" in out
    assert "length: 10 steps (train.max_steps=10)" in out
    assert "eval: none held out (eval_split=auto" in out and "evaluation: none" in out
    assert "estimated lr search time" not in out
    assert main(["train", str(f), *_args(tiny_dir, train_f, tmp_path / "o", "train.lr=1e-3", "train.epochs=2"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001 (given)" in out and "length: 14 steps (train.epochs=2)" in out


def test_auto_on_another_key_is_one_line(capsys, tiny_dir, tmp_path):
    train_f = _rows(tmp_path / "t.jsonl", 50)
    f = tmp_path / "run.yaml"
    f.write_text("{}\n")
    assert main(["train", str(f), *_args(tiny_dir, train_f, tmp_path / "o", "train.batch_size=auto"),
                 "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.batch_size does not take auto" in err
