"""train.report_to (TensorBoard, W&B offline, MLflow file store) and --no-progress log lines: every logged number
is read back from the tracker's own files with the tracker's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loratune.cli import main
from loratune.errors import ConfigError
from loratune.training.config import load_run_config
from loratune.training.loop import train
from loratune.training.tracking import RunLog, check_trackers, log_interval


def _cfg(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                                  f"output_dir={out}", "train.max_steps=4", "train.batch_size=4", "lora.r=2",
                                  "train.lr=1e-2", "data.max_seq_len=48", "train.eval_every=2", *extra])


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


needs = {name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} is not installed")
         for name in ("tensorboard", "wandb", "mlflow")}


@needs["tensorboard"]
def test_tensorboard_event_files_hold_the_logged_scalars(tiny_dir, data_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tiny_dir, data_files, tmp_path, "train.report_to=[tensorboard]"), progress=False)
    rows = _jsonl(tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)  # (stored as float32)
    evals = acc.Scalars("train/eval_loss")
    assert [e.step for e in evals] == [2, 4]
    assert [e.value for e in evals] == pytest.approx([r["eval_loss"] for r in rows if "eval_loss" in r], rel=1e-6)
    assert acc.Scalars("final/eval_loss")[0].value == pytest.approx(rows[-1]["eval_loss"], rel=1e-6)


@needs["mlflow"]
def test_mlflow_file_store_holds_the_logged_metrics(tiny_dir, data_files, tmp_path):
    from mlflow.tracking import MlflowClient

    train(_cfg(tiny_dir, data_files, tmp_path, "train.report_to=mlflow"), progress=False)
    rows = _jsonl(tmp_path)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("loratune").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train.loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [r["step"] for r in rows]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in rows])
    assert run.data.params["train.lr"] == "0.01" and run.data.params["lora.r"] == "2"
    assert run.data.metrics["final.eval_loss"] == pytest.approx(rows[-1]["eval_loss"])


@needs["wandb"]
@pytest.mark.slow
def test_wandb_offline_run_records_the_last_values(tiny_dir, data_files, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_cfg(tiny_dir, data_files, tmp_path, "train.report_to=[wandb]"), progress=False)
    rows = _jsonl(tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("*.wandb")  # the offline log that `wandb sync` uploads: protobuf records whose history
    raw = log.read_bytes()             # items carry each value as JSON text, so every logged number is in it as is
    assert raw.count(b"train/loss") >= len(rows)
    for r in rows:
        assert json.dumps(r["loss"]).encode() in raw and json.dumps(r["grad_norm"]).encode() in raw
    assert b"final/eval_loss" in raw and json.dumps(rows[-1]["eval_loss"]).encode() in raw


def test_a_missing_tracker_is_one_line_naming_its_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ConfigError, match=r"names wandb, which is not installed here; pip install wandb") as e:
        check_trackers(["wandb"])
    assert "\n" not in str(e.value)
    check_trackers(None)
    check_trackers([])


def test_report_to_values_are_checked_and_none_means_none(tiny_dir, data_files, tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; use any of tensorboard, wandb, mlflow"):
        _cfg(tiny_dir, data_files, tmp_path, "train.report_to=[tensorbord]")
    assert _cfg(tiny_dir, data_files, tmp_path, "train.report_to=none").train.report_to is None
    assert _cfg(tiny_dir, data_files, tmp_path, "train.report_to=[none]").train.report_to is None
    assert _cfg(tiny_dir, data_files, tmp_path,
                "train.report_to=tensorboard,mlflow").train.report_to == ["tensorboard", "mlflow"]


def test_no_progress_prints_one_line_per_log_interval(tiny_dir, data_files, tmp_path, capsys):
    train_f, eval_f = data_files
    (tmp_path / "run.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "run.yaml"), f"model={tiny_dir}", f"data.train={train_f}",
                 f"data.eval={eval_f}", f"output_dir={tmp_path / 'out'}", "train.max_steps=4", "train.batch_size=4",
                 "lora.r=2", "train.lr=1e-2", "data.max_seq_len=48", "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    rows = _jsonl(tmp_path / "out")
    assert [line.split()[1] for line in lines] == [f"{s}/4" for s in range(1, 5)]  # 4 steps: every step
    assert f"loss {rows[-1]['loss']:.4f}" in lines[-1] and "tok/s" in lines[-1] and "eta 0m00s" in lines[-1]
    assert "eval_loss" in lines[-1]


def test_log_interval_gives_about_twenty_lines():
    assert log_interval(4) == 1 and log_interval(200) == 10 and log_interval(1000) == 50


def test_runlog_lines_name_step_loss_lr_speed_and_eta(tmp_path, capsys):
    log = RunLog(tmp_path, [], start=0, steps=40, progress=False)
    for step in range(1, 41):
        log.step({"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == [f"{s}/40" for s in range(2, 41, 2)]
    assert lines[-1].startswith("step 40/40  loss 0.0250  lr 1.00e-03  100 tok/s  eta ")
    assert len(_jsonl(tmp_path)) == 40


def test_every_evaluation_gets_a_line_between_the_intervals(tmp_path, capsys):
    log = RunLog(tmp_path, [], start=0, steps=40, progress=False)
    for step in range(1, 41):
        log.step({"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0,
                  **({"eval_loss": step / 100} if step % 7 == 0 else {})})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    shown = [int(line.split()[1].split("/")[0]) for line in lines]
    assert shown == sorted({*range(2, 41, 2), 7, 21, 35})  # the evaluations at odd steps too
    assert "eval_loss 0.2100" in lines[shown.index(21)] and "eval_loss" not in lines[shown.index(22)]


def test_the_bar_keeps_the_latest_eval_loss(tmp_path):
    log = RunLog(tmp_path, [], start=0, steps=10, progress=True)
    log.step({"step": 1, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0})
    assert "eval_loss" not in log.bar.postfix
    log.step({"step": 2, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "eval_loss": 0.5})
    log.step({"step": 3, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0})
    assert "eval_loss=0.5000 (step 2)" in log.bar.postfix
    log.close()
