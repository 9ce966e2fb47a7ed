"""adapters/state.py: PEFT keys of a model's adapter, and merging as a pure function of state dicts."""

from __future__ import annotations

import copy

import pytest
import torch

from loratune import LoraConfig, get_lora_model
from loratune.adapters.state import adapter_tensors, merged_state_dict
from loratune.errors import AdapterFileError

from conftest import TinyConvNet, tiny_bert_cls, tiny_gpt2, tiny_llama

CASES = {
    "llama all-linear, rank and alpha patterns, rsLoRA": (
        tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2},
                         alpha_pattern={"o_proj": 3.0}, use_rslora=True)),
    "llama embedding and lm_head": (tiny_llama, dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "lm_head"])),
    "gpt2 Conv1D (fan_in_fan_out)": (tiny_gpt2, dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj"])),
    "bert classifier with modules_to_save and bias=all": (
        tiny_bert_cls, dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")),
    "convolutions": (TinyConvNet, dict(r=2, lora_alpha=2, target_modules=["conv1", "conv2", "conv3"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_state_dict_equals_merge_and_unload(case):
    make, kwargs = CASES[case]
    torch.manual_seed(0)
    model = make()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lm = get_lora_model(model, LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():  # trained-looking biases and head, so that their copies matter
        for p in lm.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(torch.randn_like(p))
    config = lm.peft_config["default"]
    adapter = {k: v.detach().clone() for k, v in adapter_tensors(lm.model, config, "default").items()}
    got = merged_state_dict(base, adapter, config)
    want = copy.deepcopy(lm).merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    changed = 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(got[key], base[key])
    assert changed >= 2


def test_merged_state_dict_does_not_change_its_inputs():
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = {k: v.clone() for k, v in base.items()}
    lm = get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    config = lm.peft_config["default"]
    merged_state_dict(base, adapter_tensors(lm.model, config, "default"), config)
    assert all(torch.equal(base[k], snapshot[k]) for k in base)


def test_merged_state_dict_refuses_an_adapter_for_another_model():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    config = lm.peft_config["default"]
    adapter = adapter_tensors(lm.model, config, "default")
    with pytest.raises(AdapterFileError, match="base weight"):
        merged_state_dict(tiny_gpt2().state_dict(), adapter, config)
    with pytest.raises(AdapterFileError, match="does not start with"):
        merged_state_dict({}, {"q_proj.lora_A.weight": torch.zeros(2, 2)}, config)
