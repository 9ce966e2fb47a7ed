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
from loratune.quant import NF4Linear, dequantize_model, quantize_model

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


def test_forced_merge_into_4_bits_warns_with_the_measured_rounding():
    torch.manual_seed(0)
    model = get_lora_model(quantize_model(tiny_llama()), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    for _, layer in model.lora_layers():  # a trained adapter's size: it moves the logits by about 30 %
        torch.nn.init.normal_(layer.adapters["default"].lora_B, std=0.02)
    x = ids(2, 10)
    qlora_out = logits(model, x)
    exact = copy.deepcopy(model)
    dequantize_model(exact.model)
    exact_merged = exact.merge_and_unload()  # merged in full precision
    want = logits(exact_merged, x)
    assert rel_err(qlora_out, want) < 1e-5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _, layer in model.lora_layers():
            layer.merge(force=True)
    notes = [str(w.message) for w in caught if "NF4" in str(w.message)]
    assert len(notes) == 14
    moved = [float(re.search(r"by ([\d.]+)% of its norm", n).group(1)) for n in notes]
    of_delta = [float(re.search(r"norm, ([\d.e+-]+)× the adapter", n).group(1)) for n in notes]
    assert all(1 < m < 30 for m in moved) and all(0.05 < d < 5 for d in of_delta), notes[:2]
    assert all(isinstance(layer.base_layer, NF4Linear) and layer.merged for _, layer in model.lora_layers())
    got = logits(model, x)  # the merged adapter is not applied again on top
    err = rel_err(got, want)  # the merged-4-bit model against the merged-fp32 one (about 0.14 here)
    assert 0.02 < err < 0.5 and err > 1000 * rel_err(qlora_out, want), err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.unmerge_adapter()
    assert all(not layer.merged for _, layer in model.lora_layers())
