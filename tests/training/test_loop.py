"""The training loop on a tiny Llama with the real SmolLM2 tokenizer: resume, DDP, errors, LoRA+."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from loratune.ops import linear as fused
from loratune.training.config import load_run_config
from loratune.training.loop import TrainingError, latest_checkpoint, lr_lambda, make_optimizer, train

from conftest import rel_err


def _cfg(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                                  f"output_dir={out}", "train.max_steps=6", "train.batch_size=4", "lora.r=4",
                                  "train.lr=1e-2", "data.max_seq_len=64", *extra])


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_training_lowers_loss_and_writes_outputs(tiny_dir, data_files, tmp_path):
    res = train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=12"), progress=False)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/chat_template.jinja",
                 "loss_curve.png", "metrics.jsonl", "run_config.yaml"):
        assert (tmp_path / name).is_file(), name
    assert "eval_loss" in res.history[-1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 12
    assert not fused.holds_input()  # the last x⊙mask is let go after training


def test_killed_and_resumed_run_ends_with_the_same_adapter(tiny_dir, data_files, tmp_path):
    full = tmp_path / "full"
    train(_cfg(tiny_dir, data_files, full, "train.save_every=2"), progress=False)
    part = tmp_path / "part"
    cfg = _cfg(tiny_dir, data_files, part, "train.save_every=2")
    train(cfg, progress=False, stop_after=3)  # "killed" after step 3: last checkpoint is step 2
    assert latest_checkpoint(part).name == "step-0000002"
    res = train(cfg, progress=False)  # the same command again resumes
    assert [h["step"] for h in res.history] == list(range(1, 7))
    a, b = _adapter(full), _adapter(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def test_output_dir_with_another_config_is_refused(tiny_dir, data_files, tmp_path):
    train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=1"), progress=False)
    with pytest.raises(TrainingError, match=r"different config \(lora.r: 4 -> 8\).*--overwrite"):
        train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=1", "lora.r=8"), progress=False)
    train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=1", "lora.r=8"), overwrite=True, progress=False)


def test_checkpoint_from_another_config_is_refused(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.save_every=1")
    train(cfg, progress=False, stop_after=2)
    state = latest_checkpoint(tmp_path) / "trainer_state.json"
    d = json.loads(state.read_text())
    d["config"] = d["config"].replace("r: 4", "r: 5")
    state.write_text(json.dumps(d))
    with pytest.raises(TrainingError, match="checkpoint .* different config"):
        train(cfg, progress=False)


def test_non_finite_loss_names_the_step(tiny_dir, data_files, tmp_path):
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step 2; lower train.lr"):
        train(_cfg(tiny_dir, data_files, tmp_path, "train.lr=1e30", "train.max_grad_norm=0", "train.max_steps=3"),
              progress=False)


def test_grad_accum_equals_bigger_batch(tiny_dir, data_files, tmp_path):
    base = ["lora.dropout=0"]
    train(_cfg(tiny_dir, data_files, tmp_path / "a", *base, "train.batch_size=8"), progress=False)
    train(_cfg(tiny_dir, data_files, tmp_path / "b", *base, "train.batch_size=4", "train.grad_accum=2"),
          progress=False)
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    for k in a:  # same math, another summation order: equal to float rounding
        assert rel_err(b[k], a[k]) <= 1e-5, k


def _free_port() -> int:
    with socket.socket() as s:  # a port nobody holds now (a fixed one may be taken by another test run)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, out, args, nproc=2, timeout=600):
    """``torchrun --nproc_per_node=nproc -m loratune train`` with ``args`` as overrides; the finished process."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={_free_port()}", "-m", "loratune", "train", str(cfg_file), *args,
                           f"output_dir={out}", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("batch, accum, steps", [
    (3, 1, 8),  # the 6th global batch has 2 rows: rank 0 gets 2 of its 3, rank 1 none; then epoch 2
    (3, 2, 4),  # the 3rd has 8 rows: rank 0 two micro-batches of 3, rank 1 one of 2; then epoch 2
])
def test_torchrun_two_processes_match_one(tiny_dir, data_files, tmp_path, batch, accum, steps, mode):
    """2 gloo processes at batch b × accum a = 1 process at batch b × accum 2a (the same global batches), also
    where a global batch is short and a rank has fewer rows than the other, or none, and across an epoch's end:
    every rank takes part in every collective, and the loss is divided by the global batch's token count.

    fsdp: FSDP2 shards each decoder layer (adapters included) over the two processes and reduce-scatters their
    gradients; the adapter is gathered and saved by rank 0. The gradient must be the sum over processes, not the
    mean (FSDP's default, pytorch/pytorch#162338): the logged gradient norms and the adapter both show it."""
    base = ["lora.dropout=0", f"train.batch_size={batch}", f"train.max_steps={steps}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same products, the same rounding
    try:
        one = train(_cfg(tiny_dir, data_files, tmp_path / "one", *base, f"train.grad_accum={2 * accum}"),
                    progress=False)
    finally:
        torch.set_num_threads(threads)
    train_f, eval_f = data_files
    args = [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}", "lora.r=4", "train.lr=1e-2",
            "data.max_seq_len=64", *base, f"train.grad_accum={accum}", f"train.distributed={mode}"]
    r = _torchrun(tmp_path, tmp_path / "two", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("train loss") == 1  # one summary, from rank 0
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].shape == a[k].shape and rel_err(b[k], a[k]) <= 1e-5, k
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in logged] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    assert [h["grad_norm"] for h in logged] == pytest.approx([h["grad_norm"] for h in one.history], rel=1e-5)


@pytest.mark.slow
def test_torchrun_fsdp_run_killed_and_resumed_ends_with_the_same_adapter(tiny_dir, data_files, tmp_path):
    """A 2-process FSDP run with dropout, its last checkpoints and adapter removed (as if killed after step 4), run
    again: it resumes from step 4 (whole adapter and optimizer state sharded again, each process's own dropout
    generator) and ends bit for bit where the uninterrupted run ended."""
    train_f, _ = data_files
    args = [f"model={tiny_dir}", f"data.train={train_f}", "lora.r=4", "train.lr=1e-2", "data.max_seq_len=64",
            "lora.dropout=0.1", "train.batch_size=3", "train.max_steps=8", "train.distributed=fsdp",
            "train.save_every=2", "train.keep_checkpoints=5"]
    out = tmp_path / "run"
    assert _torchrun(tmp_path, out, args).returncode == 0
    full = _adapter(out)
    for name in ("checkpoints/step-0000006", "checkpoints/step-0000008", "adapter"):
        shutil.rmtree(out / name)
    r = _torchrun(tmp_path, out, args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "(step 4 of 8)" in r.stdout
    again = _adapter(out)
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_loraplus_gives_b_a_larger_lr(tiny_dir, data_files, tmp_path):
    from loratune import LoraConfig, get_lora_model

    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.loraplus_lr_ratio=16")
    lm = get_lora_model(LlamaForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    opt = make_optimizer(lm, cfg.train)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 0.16]
    b_params = {id(ad.lora_B) for _, layer in lm.lora_layers() for ad in layer.adapters.values()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == b_params
    # DoRA: the magnitude vector goes with B, as in PEFT's LoRA+ (every 1-D LoRA parameter there)
    lm = get_lora_model(LlamaForCausalLM.from_pretrained(tiny_dir),
                        LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    opt = make_optimizer(lm, cfg.train)
    ads = [ad for _, layer in lm.lora_layers() for ad in layer.adapters.values()]
    fast = {id(p) for p in opt.param_groups[1]["params"]}
    assert fast == {id(ad.lora_B) for ad in ads} | {id(ad.lora_magnitude_vector) for ad in ads}
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(ad.lora_A) for ad in ads}


def test_schedules():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert f(0) < f(1) < f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0


def test_logged_lr_is_the_rate_the_step_used(tiny_dir, data_files, tmp_path):
    res = train(_cfg(tiny_dir, data_files, tmp_path, "train.max_steps=3", "train.warmup_ratio=0",
                     "train.scheduler=linear"), progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])


def test_rerunning_a_finished_run_trains_nothing(tiny_dir, data_files, tmp_path, capsys):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.max_steps=3", "train.save_every=0")
    train(cfg, progress=False)
    assert latest_checkpoint(tmp_path).name == "step-0000003"  # the last step is always checkpointed
    first = _adapter(tmp_path)
    res = train(cfg, progress=False)
    assert "run already complete" in capsys.readouterr().out
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert all(torch.equal(first[k], v) for k, v in _adapter(tmp_path).items())


def test_run_records_data_report_prompt_and_absolute_base_path(tiny_dir, data_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    cfg = _cfg(tiny_dir.name, data_files, tmp_path, "train.max_steps=1", "data.system_prompt=Be brief.")
    train(cfg, progress=False)
    assert "train: examples ready: 32" in (tmp_path / "data_report.txt").read_text()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_dir.resolve())  # usable from any working directory
    meta = json.loads((tmp_path / "adapter" / "loratune_prompt.json").read_text())
    assert meta["system_prompt"] == "Be brief." and meta["training"]["lr"] == 1e-2  # what it trained with
    assert meta["training"]["steps"] == 1 and meta["training"]["lr_search"] is None
