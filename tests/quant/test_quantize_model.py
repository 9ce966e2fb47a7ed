"""quantize_model / dequantize_model on whole models: which modules, layer by layer, settings and bad input."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from loratune.errors import AdapterFileError, ConfigError
from loratune.quant import (
    NF4Linear,
    check_quantize,
    check_same_settings,
    check_skip_vs_targets,
    dequantize_model,
    quantization_settings,
    quantize_model,
)

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_llama


def kinds(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_every_linear_but_the_head_is_quantized():
    model = quantize_model(tiny_llama())
    found = kinds(model)
    assert found.pop("lm_head") is nn.Linear
    assert len(found) == 14 and all(k is NF4Linear for k in found.values())
    assert {n.rsplit(".", 1)[-1] for n in found} == set(LLAMA_TARGETS)
    assert isinstance(model.model.embed_tokens, nn.Embedding) and model.model.embed_tokens.weight.dtype == torch.float32


def test_skip_modules_add_to_the_default():
    model = quantize_model(tiny_llama(), skip_modules=["mlp", "model.layers.1.self_attn.q_proj"])
    found = kinds(model)
    assert found["lm_head"] is nn.Linear and found["model.layers.1.self_attn.q_proj"] is nn.Linear
    assert all(k is nn.Linear for n, k in found.items() if ".mlp." in n)
    assert found["model.layers.0.self_attn.q_proj"] is NF4Linear
    assert sum(k is NF4Linear for k in found.values()) == 7


def test_quantized_model_is_close_to_the_original_and_dequantize_undoes_the_modules():
    base = tiny_llama()
    x = ids(2, 10)
    with torch.no_grad():
        want = base(input_ids=x).logits
        q = quantize_model(copy.deepcopy(base))
        got = q(input_ids=x).logits
        back = dequantize_model(copy.deepcopy(q))
        assert not any(isinstance(m, NF4Linear) for m in back.modules())
        assert rel_err(back(input_ids=x).logits, got) < 1e-6  # the same weights, now plain
        assert 0 < rel_err(got, want) < 0.2  # 4-bit rounding, not a broken model


def test_layer_by_layer_each_full_precision_weight_goes_before_the_next_layer(monkeypatch):
    model = tiny_llama()
    weights = {n: weakref.ref(m.weight) for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    alive_at_each_step = []
    real = NF4Linear.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        gc.collect()
        alive_at_each_step.append(sum(r() is not None for r in weights.values()))
        return real(cls, linear, *args, **kwargs)

    monkeypatch.setattr(NF4Linear, "from_linear", classmethod(spy))
    quantize_model(model)
    gc.collect()
    n = len(weights)
    assert alive_at_each_step == list(range(n, 0, -1)), alive_at_each_step  # one fewer before each layer
    assert all(r() is None for r in weights.values())


def test_settings_are_recorded_and_compared():
    assert quantization_settings(tiny_llama()) is None
    model = quantize_model(tiny_llama(), compute_dtype=torch.bfloat16, blocksize=128)
    rec = quantization_settings(model)
    assert rec == {"quantize": "nf4", "blocksize": 128, "double_quant": True, "compute_dtype": "bfloat16",
                   "quantize_skip_modules": [], "quantized_modules": 14}
    skipping = quantization_settings(quantize_model(tiny_llama(), skip_modules=["mlp", "mlp"]))
    assert skipping["quantize_skip_modules"] == ["mlp"] and skipping["quantized_modules"] == 8
    check_same_settings(rec, dict(rec), "adapter/")
    with pytest.raises(AdapterFileError) as e:
        check_same_settings(rec, quantization_settings(quantize_model(tiny_llama())), "adapter/")
    msg = str(e.value)
    assert "\n" not in msg and "blocksize 128 (now 64)" in msg and "compute_dtype 'bfloat16' (now 'float32')" in msg
    with pytest.raises(AdapterFileError, match="quantize 'nf4' \\(now None\\)"):
        check_same_settings(rec, None, "adapter/")
    check_same_settings(None, None, "adapter/")


def test_quantize_values():
    assert check_quantize("nf4") == "nf4" and check_quantize(" NF4 ") == "nf4"
    assert check_quantize(None) is None and check_quantize("none") is None


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("bad, error, words", [
    (lambda: check_quantize("int8"), ConfigError, ["'int8'", "'nf4'"]),
    (lambda: check_quantize(4), ConfigError, ["4", "'nf4'"]),
    (lambda: quantize_model(tiny_llama(), compute_dtype=torch.float16), ConfigError, ["float16", "bfloat16"]),
    (lambda: quantize_model(tiny_llama(), blocksize=100), ConfigError, ["100", "64"]),
    (lambda: quantize_model(tiny_llama(), skip_modules=["nonexistent"]), ConfigError, ["'nonexistent'", "lm_head"]),
    (lambda: quantize_model(Tied()), ConfigError, ["'a'", "tied", "'b.weight'"]),
    (lambda: check_skip_vs_targets(["q_proj", "lm_head"], ["q_proj", "v_proj"]), ConfigError,
     ["['q_proj']", "target_modules", "quantize_skip_modules"]),
])
def test_bad_input_is_one_line_naming_the_fix(bad, error, words):
    with pytest.raises(error) as e:
        bad()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
