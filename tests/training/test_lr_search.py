"""train.lr: auto — the search picks the best rate, is deterministic, leaves the adapter as it found it, is saved
before training and not repeated by a resumed run; a run too short to search falls back with a note."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from loratune.adapters import get_lora_model
from loratune.data import prepare
from loratune.errors import ConfigError, ConfigWarning
from loratune.models import load_base_model
from loratune.training import loop, lr_search
from loratune.training.config import load_run_config
from loratune.training.loop import train
from loratune.training.lr_search import FALLBACK_LR, SearchPlan, plan_search, search_lr, snapshot


def _cfg(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                                  f"output_dir={out}", "train.batch_size=4", "lora.r=4", "data.max_seq_len=64",
                                  *extra])


def _setup(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.max_steps=12")
    model, tok = load_base_model(str(tiny_dir))
    data = prepare(cfg.data, tok, seed=0)
    torch.manual_seed(0)
    return cfg, get_lora_model(model, cfg.lora_config()), tok, data


def test_search_picks_the_rate_between_one_too_small_and_one_too_large(tiny_dir, data_files, tmp_path):
    cfg, lm, tok, data = _setup(tiny_dir, data_files, tmp_path)
    before = snapshot(lm)
    # 1e-7 barely moves the adapter, 30 throws it far off: both lose visibly to 1e-2
    plan = SearchPlan(grid=(1e-7, 1e-2, 30.0), start=1, steps_each=8, max_candidates=3, held_out=8)
    rng = torch.get_rng_state()
    a = search_lr(lm, data.train, tok.pad_token_id, cfg.train, plan, "cpu")
    assert [c["lr"] for c in a.candidates] == [1e-2, 1e-7, 30.0]  # the middle, then down (worse), then up (worse)
    losses = {c["lr"]: c["eval_loss"] for c in a.candidates}
    assert a.lr == min(losses, key=losses.get) == 1e-2
    assert losses[1e-2] < losses[1e-7] - 0.05 and losses[1e-2] < losses[30.0] - 0.05
    # the adapter and the generator are left as found: training after the search is training without it
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters() if p.requires_grad)
    assert torch.equal(torch.get_rng_state(), rng)
    b = search_lr(lm, data.train, tok.pad_token_id, cfg.train, plan, "cpu")
    assert b.candidates == a.candidates  # deterministic under the seed
    # started at the bottom, it walks up while the loss improves and stops at the first rise
    c = search_lr(lm, data.train, tok.pad_token_id, cfg.train, SearchPlan(grid=plan.grid, start=0, steps_each=8,
                                                                           max_candidates=3, held_out=8), "cpu")
    assert [x["lr"] for x in c.candidates] == [1e-7, 1e-2, 30.0] and c.lr == 1e-2
    assert {x["lr"]: x["eval_loss"] for x in c.candidates} == losses


def test_plan_stays_within_its_share_of_the_run():
    for n_rows, steps in ((600, 225), (300, 113), (20_000, 2000)):
        plan = plan_search(n_rows, steps, 8)
        assert plan.runs and plan.cost <= lr_search.SHARE * steps
        assert lr_search.MIN_STEPS <= plan.steps_each <= lr_search.MAX_STEPS
    short = plan_search(600, 20, 8)
    assert not short.runs and "too short to search" in short.note and "steps" in short.note


@pytest.mark.slow
def test_auto_run_searches_once_saves_before_training_and_matches_the_explicit_rate(tiny_dir, data_files, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr(lr_search, "SHARE", 1.0)  # (a search as long as the run: a short run, a quick test)
    out = tmp_path / "auto"
    cfg = _cfg(tiny_dir, data_files, out, "train.max_steps=12", "train.save_every=4")
    train(cfg, progress=False, stop_after=3)  # killed early in training: the search is already on disk
    saved = json.loads((out / "lr_search.json").read_text())
    assert len(saved["candidates"]) >= 2 and saved["lr"] in [c["lr"] for c in saved["candidates"]]
    assert (out / "lr_search.png").is_file()
    assert "train.lr: auto" not in (out / "run_config.yaml").read_text()
    assert "lr: auto" in (out / "run_config.yaml").read_text()  # the config is what the user gave
    written = (out / "run_config.yaml").read_text()  # and says, in a comment, what auto chose
    assert f"# chosen: train.lr: {saved['lr']:g} (the search: lr_search.json)\n" in written
    assert yaml.safe_load(written)["train"]["lr"] == "auto"

    def no_search(*a, **k):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(lr_search, "search_lr", no_search)
    train(cfg, progress=False, stop_after=8)  # (no checkpoint yet at step 3: starts over, reading the search)
    res = train(cfg, progress=False)  # resumes from step 8
    assert res.lr == saved["lr"]
    meta = json.loads((out / "adapter" / "loratune_prompt.json").read_text())["training"]
    assert meta["lr"] == saved["lr"] and meta["lr_search"]["candidates"] == saved["candidates"]
    # the same run with the chosen rate given: the same adapter, bit for bit (the search leaves no trace)
    plain = tmp_path / "plain"
    train(_cfg(tiny_dir, data_files, plain, "train.max_steps=12", f"train.lr={saved['lr']}"), progress=False)
    a, b = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(plain / "adapter" /
                                                                               "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "lr_search.json").exists()


def test_lr_auto_on_a_run_too_short_falls_back_with_a_note(tiny_dir, data_files, tmp_path):
    with pytest.warns(ConfigWarning, match=r"train.lr=auto: a run of 6 steps is too short to search .*using "
                                           r"lr=0.0002"):
        res = train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=6"), progress=False)
    assert res.lr == FALLBACK_LR
    assert f"# chosen: train.lr: {FALLBACK_LR:g} (the run is too short to search)" in (
        tmp_path / "run_config.yaml").read_text()
    assert json.loads((tmp_path / "lr_search.json").read_text())["candidates"] == []


def test_a_given_rate_is_used_as_given(tiny_dir, data_files, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "resolve_lr", lambda *a, **k: pytest.fail("searched although train.lr was given"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        res = train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=2", "train.lr=3e-3"), progress=False)
    assert res.lr == 3e-3 and [h["lr"] for h in res.history][0] == pytest.approx(3e-3)


@pytest.mark.parametrize("override,key", [("train.batch_size=auto", "train.batch_size"), ("lora.r=auto", "lora.r"),
                                          ("train.warmup_ratio=auto", "train.warmup_ratio")])
def test_auto_on_a_key_that_does_not_take_it_is_one_line(tiny_dir, data_files, tmp_path, override, key):
    with pytest.raises(ConfigError) as e:
        _cfg(tiny_dir, data_files, tmp_path, override)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key} does not take auto")
    assert "train.lr, train.epochs, data.eval_split" in msg


def test_auto_values_are_read_and_numbers_stay_numbers(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path)
    assert cfg.train.lr == "auto" and cfg.train.auto_epochs and cfg.data.eval_split == "auto"
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.lr=1e-4", "train.epochs=2", "data.eval=null",
               "data.eval_split=0.2")
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 2.0 and not cfg.train.auto_epochs
    assert cfg.data.eval_split == 0.2 and cfg.train.patience == 0 and not cfg.train.keep_best


@pytest.mark.slow
def test_overwrite_searches_again(tiny_dir, data_files, tmp_path, monkeypatch):
    monkeypatch.setattr(lr_search, "SHARE", 1.0)
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.max_steps=12")
    calls = []
    real = lr_search.search_lr
    monkeypatch.setattr(lr_search, "search_lr", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(cfg, progress=False, stop_after=1)
    train(cfg, progress=False, stop_after=1)  # the same run again: its search is read back
    assert len(calls) == 1
    train(cfg, overwrite=True, progress=False, stop_after=1)  # a run replaced: its search goes with it
    assert len(calls) == 2
