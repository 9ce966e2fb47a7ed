"""LoraConfig validation: every problem reported at once, each with its fix."""

from __future__ import annotations

import json

import pytest

from loratune import ConfigError, LoraConfig


def test_defaults_match_peft():
    c = LoraConfig(target_modules=["q_proj"])
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.init_lora_weights) == (8, 8, 0.0, "none", True)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -3}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout must be in \[0, 1\)"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive"),
    ({"bias": "some"}, "bias must be one of"),
    ({"init_lora_weights": "pissa_fast"}, "init_lora_weights must be"),
    ({"layers_to_transform": "0"}, "layers_to_transform must be"),
    ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]"),
    ({"task_type": "CAUSAL"}, "task_type must be one of"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(target_modules=["q_proj"], **kwargs)


def test_all_problems_at_once():
    with pytest.raises(ConfigError) as e:
        LoraConfig(r=0, lora_dropout=2, target_modules=None)
    msg = str(e.value)
    assert "r must" in msg and "lora_dropout" in msg and "target_modules is required" in msg
    assert "\n" not in msg


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'lora_alhpa' \(did you mean 'lora_alpha'\?\)"):
        LoraConfig(target_modules=["q"], lora_alhpa=16)
    with pytest.raises(ConfigError, match="unknown key 'rank'"):
        LoraConfig.from_dict({"target_modules": ["q"], "rank": 4})


def test_peft_dict_round_trip_and_unsupported_features():
    c = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True,
                   rank_pattern={"v_proj": 2})
    d = json.loads(json.dumps(c.to_dict()))
    assert d["peft_type"] == "LORA" and d["use_dora"] is False
    assert LoraConfig.from_dict(d) == c
    d["use_qalora"] = True  # (use_dora is supported: adapters/variants)
    with pytest.raises(ConfigError, match="use_qalora=True is a PEFT feature loratune does not support"):
        LoraConfig.from_dict(d)
    with pytest.raises(ConfigError, match="loads LoRA adapters only"):
        LoraConfig.from_dict({**c.to_dict(), "peft_type": "IA3"})


def test_sets_become_sorted_lists():
    assert LoraConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]
