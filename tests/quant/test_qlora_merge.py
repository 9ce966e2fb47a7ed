"""Merging a QLoRA adapter: into a full-precision copy of the dequantized base (what it was trained against), and
into the 4-bit weights only when forced, with a warning that measures the added rounding."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from loratune import LoraConfig, get_lora_model
from loratune.adapters.layers import LoraLayer
from loratune.adapters.state import adapter_tensors, merged_state_dict
from loratune.errors import LoraTuneError
from loratune.quant import NF4Linear, dequantize_model, forced_merge_report, quantize_model

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_llama


def qlora(seed=0):
    """A QLoRA model on an NF4 tiny Llama with random, non-trivial adapters (its A and B both random)."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    return get_lora_model(quantize_model(tiny_llama()), cfg), cfg


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


def test_merging_into_4_bits_is_refused_without_force():
    model, _ = qlora()
    x = ids(2, 10)
    before = logits(model, x)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith("packed")}
    with pytest.raises(LoraTuneError) as e:
        model.merge_adapter()
    msg = str(e.value)
    assert "\n" not in msg and "force=True" in msg and "dequantize_model" in msg, msg
    assert all(torch.equal(b, packed[n]) for n, b in model.named_buffers() if n.endswith("packed"))
    assert torch.equal(logits(model, x), before)


def test_merge_into_the_dequantized_copy_gives_the_trained_model():
    model, cfg = qlora()
    x = ids(2, 10)
    want = logits(model, x)
    full = dequantize_model(copy.deepcopy(model).model)  # the full-precision copy, LoRA layers and all
    assert not any(isinstance(m, NF4Linear) for m in full.modules())
    lm = copy.deepcopy(model)
    dequantize_model(lm.model)
    plain = lm.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert rel_err(logits(plain, x), want) < 1e-5
    # the same through the pure function, from the dequantized base's state dict and the adapter's file tensors
    base = dequantize_model(quantize_model(tiny_llama()))
    sd = merged_state_dict(base.state_dict(), {k: v.detach() for k, v in adapter_tensors(
        model.model, model.peft_config["default"], "default").items()}, cfg)
    fresh = tiny_llama()
    fresh.load_state_dict(sd)
    assert rel_err(logits(fresh, x), want) < 1e-5


def _trained_size_qlora():
    """A QLoRA tiny Llama whose adapter has a trained one's size (it moves the logits by about 30 %), and the
    merged-fp32 model's logits on x."""
    torch.manual_seed(0)
    model = get_lora_model(quantize_model(tiny_llama()), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    for _, layer in model.lora_layers():
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)
    return model


def test_merge_and_unload_into_4_bits_is_refused_without_force():
    model = _trained_size_qlora()
    with pytest.raises(LoraTuneError, match="force=True"):
        model.merge_and_unload()
    assert all(isinstance(layer.base_layer, NF4Linear) and not layer.merged for _, layer in model.lora_layers())


def _merged_fp32_logits(model, x):
    exact = copy.deepcopy(model)
    dequantize_model(exact.model)
    return logits(exact.merge_and_unload(), x)


def test_forced_merge_into_4_bits_warns_per_layer_with_the_measured_rounding():
    model = _trained_size_qlora()
    x = ids(2, 10)
    qlora_out = logits(model, x)
    want = _merged_fp32_logits(model, x)
    assert rel_err(qlora_out, want) < 1e-5
    layers = {name: (layer.base_layer.weight.dequantize().double(), layer.delta_weight("default").detach().double())
              for name, layer in model.lora_layers()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _, layer in model.lora_layers():
            layer.merge(force=True)
    notes = [str(w.message) for w in caught if "NF4" in str(w.message)]
    assert len(notes) == 14 and all("\n" not in n and "dequantize_model" in n for n in notes)
    # each figure against this test's own float64 measurement of the same layer on its own random inputs
    g = torch.Generator().manual_seed(1)
    for note, (name, layer) in zip(notes, model.lora_layers(), strict=True):
        w, delta = layers[name]
        xs = torch.randn(256, w.shape[1], generator=g, dtype=torch.float64)
        exact = xs @ (w + delta).T
        rounding = (xs @ (layer.base_layer.weight.dequantize().double() - w - delta).T).norm() / exact.norm()
        own = (xs @ delta.T).norm() / exact.norm()
        said = re.search(r"changes its outputs by ([\d.]+)%.* changes them by ([\d.]+)%", note)
        assert said, note
        assert abs(float(said.group(1)) / 100 - rounding) < 0.25 * rounding, (note, rounding)
        assert abs(float(said.group(2)) / 100 - own) < 0.25 * own, (note, own)
        assert 0.005 < rounding < 0.3
    assert all(isinstance(layer.base_layer, NF4Linear) and layer.merged for _, layer in model.lora_layers())
    got = logits(model, x)  # the merged adapter is not applied again on top
    err = rel_err(got, want)  # the merged-4-bit model against the merged-fp32 one (about 0.14 here)
    assert 0.02 < err < 0.5 and err > 1000 * rel_err(qlora_out, want), err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.unmerge_adapter()
    assert all(not layer.merged for _, layer in model.lora_layers())


def test_forced_merge_report_gives_one_warning_with_the_model_output_error():
    model = _trained_size_qlora()
    probe = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))  # the report's own probe
    want = _merged_fp32_logits(model, probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with forced_merge_report(model.model):
            model.merge_adapter(force=True)
    notes = [str(w.message) for w in caught if "NF4" in str(w.message)]
    assert len(notes) == 1 and "\n" not in notes[0] and "14 NF4 linear" in notes[0], notes
    said = float(re.search(r"full-precision merge's by ([\d.]+)%", notes[0]).group(1)) / 100
    measured = rel_err(logits(model, probe), want)  # merged-4-bit against merged-fp32, measured here
    assert 0.02 < measured < 0.5 and abs(said - measured) < 1e-3 + 0.01 * measured, (said, measured)
    assert all(layer.merged for _, layer in model.lora_layers())
    # nested (as merge_adapter may itself wrap its loop), still one warning; on a model without NF4 layers, none
    model2 = _trained_size_qlora()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with forced_merge_report(model2.model), forced_merge_report(model2.model):
            model2.merge_adapter(force=True)
        with forced_merge_report(tiny_llama()):
            pass
    assert len([w for w in caught if "NF4" in str(w.message)]) == 1


def test_merge_adapter_with_force_gives_one_model_wide_warning_by_itself():
    model = _trained_size_qlora()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter(force=True)  # no forced_merge_report around it: LoraModel wraps its own loop
    notes = [str(w.message) for w in caught if "NF4" in str(w.message)]
    assert len(notes) == 1 and "14 NF4 linear" in notes[0] and "full-precision merge's by" in notes[0], notes


def test_a_target_kept_in_full_precision_is_refused_from_python_too():
    base = quantize_model(tiny_llama(), skip_modules=["q_proj"])
    with pytest.raises(LoraTuneError) as e:
        get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "q_proj" in str(e.value) and "quantize_skip_modules" in str(e.value) and "\n" not in str(e.value)
