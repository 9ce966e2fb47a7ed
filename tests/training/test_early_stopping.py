"""epochs: auto — the step budget, the evaluations it chooses, early stopping on the eval loss and the best
adapter kept bit-exactly (also across a resume); explicit lengths are left alone."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from loratune.training import loop
from loratune.training.config import load_run_config
from loratune.training.loop import train
from loratune.training.optim import auto_steps, eval_every, total_steps

# eval losses by evaluation: the best is the 2nd; patience 2 stops the run at the 4th
SCRIPT = [3.0, 2.0, 2.5, 2.6, 1.0, 0.5]


def _cfg(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                                  f"output_dir={out}", "train.batch_size=4", "lora.r=4", "data.max_seq_len=64",
                                  "train.lr=1e-2", *extra])


@pytest.fixture
def scripted_eval(monkeypatch):
    """The loop's eval loss follows SCRIPT, one value per evaluation (the real one is not what is tested)."""
    calls = []

    def fake(lm, examples, pad, bs):
        calls.append(1)
        return {"loss": SCRIPT[len(calls) - 1]}

    monkeypatch.setattr(loop, "eval_loss", fake)
    return calls


def _weights(d):
    return load_file(d / "adapter_model.safetensors")


def test_auto_budget_grows_with_the_data_and_is_capped():
    assert auto_steps(100, 8) == 100  # at least 800 row-passes
    assert auto_steps(600, 8) == 225  # three passes
    assert auto_steps(100_000, 8) == 2000  # at most 16 000
    assert [auto_steps(n, 8) for n in (300, 1000, 3000)] == sorted(auto_steps(n, 8) for n in (300, 1000, 3000))


def test_eval_cadence_is_chosen_only_for_auto_length(tiny_dir, data_files, tmp_path):
    auto = _cfg(tiny_dir, data_files, tmp_path).train
    assert total_steps(32, auto, 1)[1] == 200 and eval_every(auto, 200) == 20
    assert eval_every(_cfg(tiny_dir, data_files, tmp_path, "train.eval_every=7").train, 200) == 7
    fixed = _cfg(tiny_dir, data_files, tmp_path, "train.epochs=2").train
    assert total_steps(32, fixed, 1)[1] == 16 and eval_every(fixed, 16) == 0 and fixed.patience == 0


def test_early_stopping_stops_and_keeps_the_best_adapter_bit_exactly(tiny_dir, data_files, tmp_path, scripted_eval,
                                                                     capsys):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.max_steps=12", "train.eval_every=2", "train.save_every=2",
               "train.keep_checkpoints=20", "train.early_stopping_patience=2", "train.load_best=true")
    res = train(cfg, progress=False)
    assert res.steps == 8 and res.stopped_early and res.best_step == 4  # evaluations at 2, 4, 6, 8
    assert [h["eval_loss"] for h in res.history if "eval_loss" in h] == SCRIPT[:4]
    assert "early stopping at step 8: no new best eval loss over the last 2 evaluations" in capsys.readouterr().out
    final, best = _weights(tmp_path / "adapter"), _weights(tmp_path / "checkpoints" / "step-0000004" / "adapter")
    last = _weights(tmp_path / "checkpoints" / "step-0000008" / "adapter")
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)  # (the last step's adapter is another one)
    meta = json.loads((tmp_path / "adapter" / "loratune_prompt.json").read_text())["training"]
    assert meta["stopped_early"] and meta["best_step"] == 4 and meta["steps"] == 8 and meta["planned_steps"] == 12
    # rerunning the command: the run is complete, nothing is trained, the adapter is the same
    again = train(cfg, progress=False)
    assert len(scripted_eval) == 4 and again.steps == 8
    assert "stopped early" in capsys.readouterr().out
    assert all(torch.equal(_weights(tmp_path / "adapter")[k], best[k]) for k in best)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_early_stop_and_best_adapter(tiny_dir, data_files, tmp_path, scripted_eval):
    extra = ("train.max_steps=12", "train.eval_every=2", "train.save_every=2", "train.early_stopping_patience=2",
             "train.load_best=true")
    whole = tmp_path / "whole"
    train(_cfg(tiny_dir, data_files, whole, *extra), progress=False)
    scripted_eval.clear()
    cut = tmp_path / "cut"
    cfg = _cfg(tiny_dir, data_files, cut, *extra)
    train(cfg, progress=False, stop_after=6)  # killed after the best (step 4), before the stop (step 8)
    assert len(scripted_eval) == 3  # (so the resumed run's evaluation at step 8 is the script's 4th)
    res = train(cfg, progress=False)
    assert res.steps == 8 and res.best_step == 4 and res.stopped_early
    a, b = _weights(whole / "adapter"), _weights(cut / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_length_trains_to_the_end_without_early_stopping(tiny_dir, data_files, tmp_path, scripted_eval):
    res = train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=8", "train.eval_every=2"), progress=False)
    assert res.steps == 8 and not res.stopped_early and res.best_step is None
    assert len(scripted_eval) == 4


# --- extending a finished run (issue 22) ------------------------------------------------------------------------
@pytest.mark.slow
def test_raising_max_steps_extends_a_finished_run_like_an_uninterrupted_longer_one(tiny_dir, data_files, tmp_path):
    extra = ("train.scheduler=constant", "train.warmup_ratio=0", "train.save_every=2")
    longer = tmp_path / "longer"
    whole = train(_cfg(tiny_dir, data_files, longer, "train.max_steps=8", *extra), progress=False)
    ext = tmp_path / "ext"
    first = train(_cfg(tiny_dir, data_files, ext, "train.max_steps=4", *extra), progress=False)
    with pytest.warns(UserWarning, match=r"extending the run in .*max_steps: 4 -> 8.*continues from step-0000004"):
        res = train(_cfg(tiny_dir, data_files, ext, "train.max_steps=8", *extra), progress=False)
    assert res.steps == 8 and [h["step"] for h in res.history] == list(range(1, 9))
    a, b = _weights(longer / "adapter"), _weights(ext / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in whole.history]
    assert res.seconds >= first.seconds  # the run's training time, both sessions
    assert "max_steps: 8" in (ext / "run_config.yaml").read_text()
    # shortening below the trained steps is refused in one line; another change still needs --overwrite
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before anything else: no "extending the run" note first
        with pytest.raises(loop.TrainingError, match="trained to step 8, past this config's 6 steps"):
            train(_cfg(tiny_dir, data_files, ext, "train.max_steps=6", *extra), progress=False)
    with pytest.raises(loop.TrainingError, match="different config"):
        train(_cfg(tiny_dir, data_files, ext, "train.max_steps=8", "train.lr=1e-3", *extra), progress=False)


# --- early_stopping_threshold -----------------------------------------------------------------------------------
def _keeper(tmp_path, losses, patience=3, threshold=0.0):
    from loratune.training.early_stop import BestKeeper

    k = BestKeeper(tmp_path, patience, False, [], threshold=threshold)
    for step, loss in enumerate(losses, 1):
        if k.update(step, loss, None):
            return k, step
    return k, None


def test_threshold_stops_a_creeping_loss_but_not_a_steady_fall(tmp_path):
    creeping = [2e-3, 3e-4, 2e-4, 1.5e-4, 1e-4, 9e-5, 8e-5]  # an easy task: each evaluation a new, tiny best
    assert _keeper(tmp_path, creeping)[1] is None  # any decrease counts: never stops
    k, at = _keeper(tmp_path, creeping, threshold=1e-3)
    assert at == 5 and k.best_loss == 1e-4 and k.best_step == 5  # the best still follows every new low
    steady = [1.0, 0.9994, 0.9988, 0.9982, 0.9976, 0.997, 0.9964]  # 6e-4 an evaluation: 1e-3 every second one
    assert _keeper(tmp_path, steady, threshold=1e-3)[1] is None
    assert _keeper(tmp_path, steady, threshold=2e-3)[1] == 4
    assert _keeper(tmp_path, [float("nan"), 1.0, 0.5, 0.6, 0.7, 0.8], threshold=1e-3)[1] == 6


def test_threshold_defaults_and_bad_values(tiny_dir, data_files, tmp_path):
    from loratune.errors import ConfigError

    assert _cfg(tiny_dir, data_files, tmp_path).train.threshold == 1e-3  # epochs auto
    assert _cfg(tiny_dir, data_files, tmp_path, "train.epochs=2").train.threshold == 0.0
    assert _cfg(tiny_dir, data_files, tmp_path, "train.early_stopping_threshold=0.01").train.threshold == 0.01
    with pytest.raises(ConfigError, match="early_stopping_threshold must be a finite number ≥ 0"):
        _cfg(tiny_dir, data_files, tmp_path, "train.early_stopping_threshold=-1")
    with pytest.raises(ConfigError, match="early_stopping_threshold' must be float"):
        _cfg(tiny_dir, data_files, tmp_path, "train.early_stopping_threshold=soon")


def test_threshold_ends_the_loop_and_says_so(tiny_dir, data_files, tmp_path, monkeypatch, capsys):
    losses = iter([1.0, 0.9995, 0.999, 0.9985, 0.998, 0.9975])
    monkeypatch.setattr(loop, "eval_loss", lambda *a: {"loss": next(losses)})
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.max_steps=12", "train.eval_every=2",
               "train.early_stopping_patience=2", "train.early_stopping_threshold=0.01", "train.load_best=true")
    res = train(cfg, progress=False)
    assert res.steps == 6 and res.stopped_early and res.best_step == 6  # no progress at 4 and 6; 6 the lowest
    assert "fell by no more than 0.01 over the last 2 evaluations" in capsys.readouterr().out
