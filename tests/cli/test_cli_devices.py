"""--device/--dtype on the commands, and merging onto a half-precision base: ΔW added in float32 and the sum rounded
once, i.e. the same bits as merging in float32 and rounding the result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from loratune import LoraConfig, get_lora_model
from loratune.cli import main


@pytest.fixture(scope="module")
def bf16_base_and_adapter(tiny_dir, tmp_path_factory):
    """The tiny model stored in bfloat16, and an adapter on it with non-zero B (a trained one's shape)."""
    d = tmp_path_factory.mktemp("bf16")
    base = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    base.save_pretrained(d / "base")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(d / "base")
    torch.manual_seed(3)
    lm = get_lora_model(LlamaForCausalLM.from_pretrained(d / "base", dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            for ad in layer.adapters.values():
                ad.lora_B.normal_(0, 0.05)
    lm.save_pretrained(d / "adapter")
    return d / "base", d / "adapter", lm


def test_merge_on_a_bf16_base_is_the_fp32_merge_rounded_once(bf16_base_and_adapter, tmp_path):
    base, adapter, lm = bf16_base_and_adapter
    assert main(["merge", "--adapter", str(adapter), "--model", str(base), "--out", str(tmp_path / "m"),
                 "--device", "cpu"]) == 0
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"  # the base's dtype
    stored = load_file(base / "model.safetensors")
    n_adapted = 0
    for path, layer in lm.lora_layers():
        key = path.removeprefix("model.") + ".weight"
        key = key if key in merged else "model." + key
        w0 = stored[key].to(torch.float64)  # bf16 weights, exact in float64
        delta = layer.delta_weight("default").to(torch.float64)
        want = (w0 + delta).to(torch.float32).to(torch.bfloat16)  # added in (at least) fp32, rounded once to bf16
        assert merged[key].dtype == torch.bfloat16
        assert torch.equal(merged[key], want), key
        twice = (stored[key] + delta.to(torch.bfloat16))  # what a merge in bf16 gives: ΔW rounded, then the sum
        n_adapted += int(not torch.equal(twice, want))
    assert n_adapted > 0  # (the test can tell the two apart)


def test_merge_dtype_flag_chooses_the_merged_precision(bf16_base_and_adapter, tmp_path):
    base, adapter, _ = bf16_base_and_adapter
    assert main(["merge", "--adapter", str(adapter), "--model", str(base), "--out", str(tmp_path / "m"),
                 "--dtype", "float32"]) == 0
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float32}


def test_generate_and_eval_take_device_and_dtype(capsys, bf16_base_and_adapter, data_files):
    base, adapter, _ = bf16_base_and_adapter
    assert main(["eval", "--adapter", str(adapter), "--model", str(base), "--data", str(data_files[1]), "--json",
                 "--device", "cpu", "--dtype", "bfloat16", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("{"):])
    assert set(rows) >= {"base", "adapter"} and rows["adapter"]["loss"] > 0
    assert main(["generate", "hi", "--adapter", str(adapter), "--model", str(base), "--dtype", "bfloat16",
                 "--max-new-tokens", "3"]) == 0
    assert main(["generate", "hi", "--model", str(base), "--dtype", "float16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype=float16 on the CPU" in err
