"""Adapter files: PEFT layout, atomic writes, and a clear error for every kind of bad file."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune import AdapterFileError, LoraConfig, LoraModel, get_lora_model
from loratune.adapters.layers import LoraLayer

from conftest import LLAMA_TARGETS, tiny_gpt2, tiny_llama


@pytest.fixture
def saved(tmp_path):
    llama = tiny_llama()
    torch.manual_seed(0)
    lm = get_lora_model(copy.deepcopy(llama),
                        LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    lm.save_pretrained(tmp_path)
    return llama, tmp_path


def test_file_layout_is_peft(saved):
    _, d = saved
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = load_file(d / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 96)
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert len(keys) == 2 * 7 * 2
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(LLAMA_TARGETS)


def test_all_linear_is_saved_expanded(tmp_path):
    lm = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(LLAMA_TARGETS)


def test_no_temp_files_left(saved):
    _, d = saved
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_missing_directory_and_files(saved, tmp_path):
    llama, d = saved
    with pytest.raises(AdapterFileError, match="does not exist"):
        LoraModel.from_pretrained(llama, tmp_path / "nope")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="lacks adapter_model.safetensors"):
        LoraModel.from_pretrained(llama, d)


def test_pickle_files_are_never_read(saved):
    llama, d = saved
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="only safetensors is read"):
        LoraModel.from_pretrained(llama, d)


def test_corrupted_safetensors(saved):
    llama, d = saved
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        LoraModel.from_pretrained(llama, d)


def test_wrong_shapes_name_module_and_both_shapes(saved):
    llama, d = saved
    f = d / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    t[key] = torch.zeros(48, 4)
    save_file(t, f)
    with pytest.raises(AdapterFileError, match=r"'model.layers.1.self_attn.k_proj' needs \(32, 4\) for "
                                               r"'lora_B.weight' but the file has \(48, 4\)"):
        LoraModel.from_pretrained(llama, d)
    # and the base model is left without half-loaded adapters
    assert not any(isinstance(m, LoraLayer) for m in llama.modules())


def test_adapter_for_another_architecture(saved):
    _, d = saved
    with pytest.raises(AdapterFileError, match="another architecture|matched no module"):
        LoraModel.from_pretrained(tiny_gpt2(), d)


def test_unknown_config_key_in_file(saved):
    llama, d = saved
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rr"] = 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"unknown key 'rr' \(did you mean 'r'\?\)"):
        LoraModel.from_pretrained(llama, d)
