"""QLoRA from the command line: `model.quantize=nf4` trains on a 4-bit base, the adapter records it, eval/generate
rebuild that base, merge exports a full-precision model, and a base quantized otherwise is refused."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM

from loratune import quant
from loratune.adapters import LoraModel
from loratune.cli import main
from loratune.cli.infer import load_for_inference
from loratune.errors import ConfigWarning
from loratune.models import load_base_model

from conftest import ids, rel_err


@pytest.fixture(scope="module")
def qtrained(tiny_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("qrun")
    cfg = out / "run.yaml"
    cfg.write_text(f"model: {tiny_dir}\n")  # the short form, opened by a dotted override below
    train_f, eval_f = data_files
    assert main(["train", str(cfg), "model.quantize=nf4", f"data.train={train_f}", f"data.eval={eval_f}",
                 f"output_dir={out}", "train.max_steps=4", "train.batch_size=4", "lora.r=4", "train.lr=1e-2",
                 "data.max_seq_len=64", "--no-progress"]) == 0
    return out


def test_the_run_and_the_adapter_record_the_quantization(qtrained, tiny_dir):
    run = yaml.safe_load((qtrained / "run_config.yaml").read_text())
    assert run["model"] == {"name": str(tiny_dir), "quantize": "nf4", "compute_dtype": "float32",
                            "quantize_skip_modules": None}
    rec = json.loads((qtrained / "adapter" / "loratune_quantization.json").read_text())
    assert rec["quantize"] == "nf4" and rec["blocksize"] == 64 and rec["quantized_modules"] == 14


def test_inference_rebuilds_the_4_bit_base_and_matches_a_fresh_qlora_model(qtrained, tiny_dir):
    model, _, _ = load_for_inference(str(qtrained / "adapter"), None)
    assert isinstance(model.model.model.layers[0].self_attn.q_proj.base_layer, quant.NF4Linear)
    base, _ = load_base_model(tiny_dir, quantize="nf4")
    again = LoraModel.from_pretrained(base, qtrained / "adapter")
    x = ids(2, 10, vocab=100)
    with torch.no_grad():
        a, b = model(x).logits, again(x).logits
        with model.disable_adapter():
            plain = model(x).logits
    assert torch.equal(a, b) and rel_err(a, plain) > 1e-4  # the adapter changes the output


def test_eval_and_generate_run_on_the_qlora_adapter(qtrained, data_files, capsys):
    assert main(["eval", "--adapter", str(qtrained / "adapter"), "--data", str(data_files[1]), "--json",
                 "--max-new-tokens", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"base", "adapter"} and rows["adapter"]["loss"] != rows["base"]["loss"]
    assert main(["generate", "What is 1 plus 2?", "--adapter", str(qtrained / "adapter"), "--max-new-tokens",
                 "3"]) == 0


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_merge_exports_a_full_precision_model_equal_to_the_qlora_model(qtrained, tmp_path, dtype):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(qtrained / "adapter"), "--out", str(out),
                 *(["--dtype", dtype] if dtype else [])]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype or "float32"))
    assert all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == getattr(torch, dtype or "float32")
    qlora, _, _ = load_for_inference(str(qtrained / "adapter"), None)
    x = ids(2, 10, vocab=100)
    with torch.no_grad():
        err = rel_err(merged.float()(x).logits, qlora(x).logits)
    assert err < (1e-2 if dtype else 1e-5), err


def test_a_base_quantized_otherwise_is_refused_naming_the_difference(qtrained, tmp_path, data_files, capsys):
    import shutil

    bad = tmp_path / "adapter"
    shutil.copytree(qtrained / "adapter", bad)
    rec = json.loads((bad / "loratune_quantization.json").read_text())
    (bad / "loratune_quantization.json").write_text(json.dumps({**rec, "quantize_skip_modules": ["mlp"]}))
    assert main(["eval", "--adapter", str(bad), "--data", str(data_files[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantized_modules 14 (now 8)" in err, err
    (bad / "loratune_quantization.json").write_text("{not json")
    assert main(["eval", "--adapter", str(bad), "--data", str(data_files[1])]) == 2
    assert "damaged" in capsys.readouterr().err


def test_a_qlora_adapter_on_a_full_precision_base_loads_with_a_note(qtrained, tiny_dir):
    base, _ = load_base_model(tiny_dir)
    with pytest.warns(ConfigWarning, match="trained on a 4-bit base"):
        LoraModel.from_pretrained(base, qtrained / "adapter")


def test_quantize_skip_modules_that_are_also_targets_are_refused(tiny_dir, data_files, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": str(tiny_dir), "quantize": "nf4",
                                             "quantize_skip_modules": ["q_proj"]},
                                   "lora": {"target_modules": ["q_proj", "v_proj"]},
                                   "data": {"train": str(data_files[0])}}))
    assert main(["train", str(cfg), f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q_proj" in err and "both in target_modules" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override, words", [
    ("model.quantize=int4", ["int4", "'nf4'"]),
    ("model.compute_dtype=float16", ["float16", "bfloat16"]),
])
def test_bad_quantize_settings_are_one_line_cli_errors(tiny_dir, data_files, tmp_path, capsys, override, words):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_dir}\n")
    overrides = [override] if override.startswith("model.quantize") else ["model.quantize=nf4", override]
    assert main(["train", str(cfg), *overrides, f"data.train={data_files[0]}", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_generate_and_chat_run_on_the_rebuilt_4_bit_base(qtrained, monkeypatch, capsys):
    from loratune.cli import infer

    built = []
    real = infer.load_base_model
    monkeypatch.setattr(infer, "load_base_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    answers = iter(["What is 1 plus 2?"])

    def typed(_prompt):
        for line in answers:
            return line
        raise EOFError  # Ctrl-D ends the chat

    monkeypatch.setattr("builtins.input", typed)
    assert main(["chat", "--adapter", str(qtrained / "adapter"), "--max-new-tokens", "3"]) == 0
    assert main(["generate", "Hi", "--adapter", str(qtrained / "adapter"), "--max-new-tokens", "3"]) == 0
    assert len(built) == 2
    for model, _ in built:
        assert quant.quantization_settings(model)["quantized_modules"] == 14
