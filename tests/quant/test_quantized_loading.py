"""load_base_model(quantize="nf4"): the layer-by-layer loader builds exactly what from_pretrained + quantize_model
builds, falls back to that path where it cannot, and refuses bad settings in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from loratune import quant
from loratune.errors import ConfigError, LoraTuneError
from loratune.models import load_base_model

from conftest import ids


def _save(tmp_path, tok_dir, tie: bool, dtype=torch.float32):
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    d = tmp_path / f"model-{tie}-{dtype}".replace("torch.", "")
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tok_dir / f).read_bytes())
    return d


def _reference(d, compute=torch.float32, skip=None):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, use_safetensors=True)
    return quant.quantize_model(model, compute, skip)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16])
def test_streamed_loading_equals_from_pretrained_then_quantize(tmp_path, tiny_dir, tie, saved, monkeypatch):
    d = _save(tmp_path, tiny_dir, tie, saved)
    calls = []
    real = quant.load_quantized
    monkeypatch.setattr(quant, "load_quantized", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, _ = load_base_model(d, quantize="nf4")
    assert calls and not model.training
    ref = _reference(d)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert quant.quantization_settings(model) == quant.quantization_settings(ref)
    x = ids(2, 12, vocab=256)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
        # generation works and matches (the generation config was read too)
        a = model.generate(x[:1], max_new_tokens=5, do_sample=False)
        b = ref.generate(x[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_streamed_loading_holds_one_linear_in_full_precision_at_a_time(tmp_path, tiny_dir, monkeypatch):
    d = _save(tmp_path, tiny_dir, tie=True)
    alive, peak = [], []
    real = quant.NF4Linear.from_linear

    def spy(linear, *a, **k):  # count the full-precision linear weights that exist while each one is quantized
        alive.append(linear)
        peak.append(sum(1 for m in alive if getattr(m, "weight", None) is not None and not m.weight.is_meta))
        return real(linear, *a, **k)

    monkeypatch.setattr(quant.NF4Linear, "from_linear", staticmethod(spy))
    model, _ = load_base_model(d, quantize="nf4")
    assert len(peak) == 14 and max(peak) == 1
    assert all(isinstance(model.get_submodule(n), quant.NF4Linear) for n in quant.linears_to_quantize(model) or [])


def test_renamed_checkpoint_keys_fall_back_to_from_pretrained(tmp_path, tiny_dir):
    d = _save(tmp_path, tiny_dir, tie=False)
    tensors = load_file(d / "model.safetensors")
    tensors["model.extra_unused.weight"] = torch.zeros(2)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    assert quant.load_quantized(AutoModelForCausalLM, d, [d / "model.safetensors"], torch.float32, torch.float32,
                                None, {}) is None
    model, _ = load_base_model(d, quantize="nf4")  # from_pretrained (which drops the extra key) + quantize_model
    assert quant.quantization_settings(model)["quantized_modules"] == 14


def test_skip_modules_and_compute_dtype_reach_the_model(tmp_path, tiny_dir):
    d = _save(tmp_path, tiny_dir, tie=False)
    model, _ = load_base_model(d, quantize="nf4", compute_dtype=torch.bfloat16, quantize_skip_modules=["mlp"])
    s = quant.quantization_settings(model)
    assert s["compute_dtype"] == "bfloat16" and s["quantized_modules"] == 8
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


@pytest.mark.parametrize("kwargs, words", [
    ({"quantize": "int4"}, ["'nf4'"]),
    ({"quantize": "nf4", "compute_dtype": torch.float16}, ["float32", "bfloat16"]),
    ({"quantize": "nf4", "quantize_skip_modules": ["no_such_module"]}, ["no_such_module", "matches no module"]),
])
def test_bad_quantize_settings_are_one_line_errors(tmp_path, tiny_dir, kwargs, words):
    d = _save(tmp_path, tiny_dir, tie=False)
    with pytest.raises((ConfigError, LoraTuneError)) as e:
        load_base_model(d, **kwargs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_config_json_is_untouched(tmp_path, tiny_dir):
    d = _save(tmp_path, tiny_dir, tie=False)
    before = json.loads((d / "config.json").read_text())
    load_base_model(d, quantize="nf4")
    assert json.loads((d / "config.json").read_text()) == before


def test_without_accelerate_loading_falls_back_to_from_pretrained(tmp_path, tiny_dir, monkeypatch):
    import sys

    d = _save(tmp_path, tiny_dir, tie=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate raises ImportError
    assert quant.load_quantized(AutoModelForCausalLM, d, [d / "model.safetensors"], torch.float32, torch.float32,
                                None, {}) is None
    model, _ = load_base_model(d, quantize="nf4")
    ref = _reference(d)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
