"""Training in another precision and on other devices: a bf16 base (adapters and loss in fp32) that learns, its
adapter reloaded in fp32 and bf16, a bf16 checkpoint resumed bit for bit, one-line errors for devices and dtypes
this machine lacks, and (marked ``cuda``, run where a GPU is) the same on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune import LoraModel, load_base_model
from loratune.cli import main
from loratune.training.config import load_run_config
from loratune.training.loop import latest_checkpoint, train

from conftest import ids, rel_err

HAS_CUDA = torch.cuda.is_available()


def _args(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}", f"output_dir={out}",
            "train.max_steps=6", "train.batch_size=4", "lora.r=4", "train.lr=1e-2", "data.max_seq_len=64", *extra]


def _cfg_file(tmp_path: Path) -> Path:
    f = tmp_path / "run.yaml"
    f.write_text("model: smollm2-135m-instruct\n")  # the short form: model.dtype=... overrides open it up
    return f


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _logits(base_dir, adapter_dir, dtype, device="cpu") -> torch.Tensor:
    base, _ = load_base_model(base_dir, dtype=dtype, device=device)
    lm = LoraModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        return lm(input_ids=ids(2, 12, vocab=100).to(device)).logits.float().cpu()


def _train_bf16_and_check(tiny_dir, data_files, tmp_path, device: str) -> None:
    out = tmp_path / "run"
    args = _args(tiny_dir, data_files, out, "model.dtype=bfloat16", f"train.device={device}", "train.max_steps=12")
    assert main(["train", str(_cfg_file(tmp_path)), *args, "--no-progress"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(losses[-4:]) < losses[0] - 0.25, losses  # it learns (a random tiny model: from 10.8 to ~10.5)
    saved = _adapter(out)
    assert {t.dtype for t in saved.values()} == {torch.float32}  # adapters stay fp32 on a bf16 base
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)
    fp32 = _logits(tiny_dir, out / "adapter", torch.float32)
    bf16 = _logits(tiny_dir, out / "adapter", torch.bfloat16, device)
    assert rel_err(bf16, fp32) < 2e-2  # the same outputs, to bf16's precision (8 bits of mantissa)
    assert rel_err(bf16, fp32) > 0  # (and really computed in bf16)


def test_bf16_run_learns_and_its_adapter_loads_in_fp32_and_bf16(tiny_dir, data_files, tmp_path):
    _train_bf16_and_check(tiny_dir, data_files, tmp_path, "cpu")


def test_bf16_base_trains_fp32_adapters_with_an_fp32_loss(tiny_dir, data_files, tmp_path):
    res = train(load_run_config(None, _args(tiny_dir, data_files, tmp_path, "model.dtype=bfloat16",
                                            "train.max_steps=1")), progress=False)
    base = {p.dtype for n, p in res.model.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16}
    assert {p.dtype for p in res.model.parameters() if p.requires_grad} == {torch.float32}
    from loratune.data import collate
    from loratune.training.evaluate import response_loss_sum

    loss, _ = response_loss_sum(res.model, collate(res.data.train[:2], res.tokenizer.pad_token_id))
    assert loss.dtype == torch.float32


def test_bf16_checkpoint_resumes_bit_exactly(tiny_dir, data_files, tmp_path):
    extra = ("model.dtype=bfloat16", "train.save_every=2")
    train(load_run_config(None, _args(tiny_dir, data_files, tmp_path / "full", *extra)), progress=False)
    cfg = load_run_config(None, _args(tiny_dir, data_files, tmp_path / "part", *extra))
    train(cfg, progress=False, stop_after=3)  # "killed" after step 3: the last checkpoint is step 2
    assert latest_checkpoint(tmp_path / "part").name == "step-0000002"
    train(cfg, progress=False)
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_devices_and_dtypes_this_machine_lacks_are_one_line_errors(capsys, tiny_dir, data_files, tmp_path,
                                                                   monkeypatch):
    cfg = str(_cfg_file(tmp_path))
    args = _args(tiny_dir, data_files, tmp_path / "out")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_line_error(capsys, ["train", cfg, *args, "train.device=cuda"])
    assert "train.device=cuda but this machine has no CUDA GPU" in err and "available: cpu" in err
    err = _one_line_error(capsys, ["train", cfg, *args, "model.dtype=float16", "train.device=cpu"])
    assert "model.dtype=float16 on the CPU: CPUs have no fast float16 products" in err
    err = _one_line_error(capsys, ["train", cfg, *args, "model.dtype=half"])
    assert "model.dtype must be one of auto, float32, bfloat16, float16, got 'half' (did you mean float16?)" in err
    err = _one_line_error(capsys, ["train", cfg, *args, "train.distributed=fsdp"])
    assert "train.distributed=fsdp shards the model over several processes, but this is one process" in err
    assert "torchrun --nproc_per_node=N" in err
    err = _one_line_error(capsys, ["generate", "hi", "--model", str(tiny_dir), "--device", "cuda"])
    assert "--device=cuda but this machine has no CUDA GPU" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = _one_line_error(capsys, ["train", cfg, *args, "train.device=cuda:3"])
    assert "train.device=cuda:3: there is no cuda:3 on this machine, it has 2 GPUs" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_short_model_form_takes_a_dotted_dtype(tmp_path, data_files):
    cfg = load_run_config(_cfg_file(tmp_path), [f"data.train={data_files[0]}", "model.dtype=bfloat16"])
    assert (cfg.model.name, cfg.model.dtype) == ("smollm2-135m-instruct", "bfloat16")
    assert load_run_config(_cfg_file(tmp_path), [f"data.train={data_files[0]}"]).model.dtype == "float32"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_bf16_run_on_cuda_learns_and_loads_on_the_cpu(tiny_dir, data_files, tmp_path):
    _train_bf16_and_check(tiny_dir, data_files, tmp_path, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_checkpoint_resumes_bit_exactly_and_matches_the_cpu(tiny_dir, data_files, tmp_path):
    extra = ("train.device=cuda", "train.save_every=2", "lora.dropout=0.1")
    train(load_run_config(None, _args(tiny_dir, data_files, tmp_path / "full", *extra)), progress=False)
    cfg = load_run_config(None, _args(tiny_dir, data_files, tmp_path / "part", *extra))
    train(cfg, progress=False, stop_after=3)
    train(cfg, progress=False)
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the CUDA generator's state travels in the checkpoint
    cpu = tmp_path / "cpu"
    train(load_run_config(None, _args(tiny_dir, data_files, cpu, "train.device=cpu", "lora.dropout=0")),
          progress=False)
    gpu = tmp_path / "gpu"
    train(load_run_config(None, _args(tiny_dir, data_files, gpu, "train.device=cuda", "lora.dropout=0")),
          progress=False)
    c, g = _adapter(cpu), _adapter(gpu)
    assert all(rel_err(g[k], c[k]) < 1e-3 for k in c)  # fp32 on both: the same training, to rounding
