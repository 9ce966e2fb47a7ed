"""Issue 20, adapters: wrong settings never train silently, broken files never load, every error is one line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loratune import AdapterFileError, ConfigError, LoraConfig, LoraModel, get_lora_model
from loratune.adapters.files import WEIGHTS_NAME
from loratune.fsutil import read_tensors, save_tensors

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_bert_cls, tiny_llama


@pytest.mark.parametrize("kwargs, words", [
    (dict(lora_alpha=math.nan), "lora_alpha must be a positive number"),
    (dict(lora_alpha=math.inf), "lora_alpha must be a positive number"),
    (dict(alpha_pattern={"q_proj": math.nan}), "alpha_pattern['q_proj'] must be a positive number"),
    (dict(target_modules="(q_proj"), "target_modules is not a valid regular expression"),
    (dict(exclude_modules="[v_proj"), "exclude_modules is not a valid regular expression"),
    (dict(rank_pattern={"q_proj(": 4}), "rank_pattern key 'q_proj(' is not a valid regular expression"),
    (dict(alpha_pattern={"*o_proj": 4}), "alpha_pattern key '*o_proj' is not a valid regular expression"),
    (dict(rank_pattern=[4]), "rank_pattern must be a mapping"),
])
def test_bad_values_are_refused_with_the_fix(kwargs, words):
    kwargs = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ConfigError) as e:
        LoraConfig(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


FORMS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "suffix": dict(target_modules=["self_attn.o_proj"]),
    "regex": dict(target_modules=r".*\.mlp\.(gate|up)_proj"),
    "all-linear": dict(target_modules="all-linear"),
    "layers_to_transform": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
}


def _count(lm: LoraModel, name: str) -> int:
    return sum(name in layer.adapters for _, layer in lm.lora_layers())


@pytest.mark.parametrize("first", list(FORMS))
@pytest.mark.parametrize("second", list(FORMS))
def test_a_second_and_third_adapter_take_every_target_form(first, second):
    """Targets expand against the model's own modules, not the LoRA wrappers' insides: a second and a third
    adapter of any form (fewer, the same or more modules than the first) target what they would alone."""
    alone = {k: _count(get_lora_model(tiny_llama(), LoraConfig(r=2, **v), "x"), "x") for k, v in FORMS.items()}
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, **FORMS[first]), adapter_name="a")
    lm.add_adapter("b", LoraConfig(r=3, **FORMS[second]))
    lm.add_adapter("c", LoraConfig(r=1, target_modules="all-linear"))
    assert (_count(lm, "a"), _count(lm, "b"), _count(lm, "c")) == (alone[first], alone[second], alone["all-linear"])
    assert not any(p.endswith("base_layer") for p in lm.peft_config["b"].target_modules
                   if isinstance(lm.peft_config["b"].target_modules, list))
    x = ids()
    lm.set_adapter("b")
    assert torch.isfinite(lm(input_ids=x).logits).all()


def test_all_linear_second_adapter_outputs_match_it_alone():
    torch.manual_seed(0)
    alone = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), adapter_name="first")
    lm.add_adapter("default", LoraConfig(r=2, target_modules="all-linear"))
    for (_, layer), (_, twin) in zip(lm.lora_layers(), alone.lora_layers(), strict=True):
        layer.adapters["default"].load_state_dict(twin.adapters["default"].state_dict())
    lm.set_adapter("default")
    assert rel_err(lm(input_ids=ids()).logits, alone(input_ids=ids()).logits) < 1e-6


def test_modules_to_save_that_matches_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"modules_to_save=\['foo_head'\] matched no module.*top-level modules"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["foo_head"]))
    # the heads task_type="SEQ_CLS" adds (classifier, score) are optional, as in PEFT: BERT has only one
    get_lora_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))


def test_a_filter_that_removes_every_match_is_named():
    with pytest.raises(ConfigError, match="exclude_modules=.*removed all of them"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=r".*q_proj"))
    with pytest.raises(ConfigError, match=r"layers_to_transform=\[7\] kept none of them \(its layers are 0\.\.1\)"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    with pytest.raises(ConfigError, match="matched no module.*can be targeted"):
        get_lora_model(tiny_llama(), LoraConfig(target_modules=["nope"]))


@pytest.fixture
def saved(tmp_path):
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    lm.save_pretrained(tmp_path / "ad")
    return tmp_path / "ad"


def _rewrite(directory, change):
    tensors = read_tensors(directory / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key] = change(tensors[key])
    save_tensors(tensors, directory / WEIGHTS_NAME)
    return key


@pytest.mark.parametrize("change, words", [
    (lambda t: t.clone().fill_(float("nan")), "holds NaN or infinite values"),
    (lambda t: torch.full_like(t, float("inf")), "holds NaN or infinite values"),
    (lambda t: t.to(torch.int64), "is torch.int64, not a floating-point tensor"),
])
def test_broken_adapter_tensors_are_refused_naming_the_tensor(saved, change, words):
    key = _rewrite(saved, change)
    with pytest.raises(AdapterFileError) as e:
        LoraModel.from_pretrained(tiny_llama(), saved)
    assert words in str(e.value) and key in str(e.value)


def test_an_adapter_config_that_is_not_utf8_is_one_error(saved):
    (saved / "adapter_config.json").write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(ConfigError, match="cannot read .*adapter_config.json.*re-save the adapter"):
        LoraModel.from_pretrained(tiny_llama(), saved)


def test_an_adapter_path_that_is_a_file_says_so(saved):
    with pytest.raises(AdapterFileError, match="is a file; pass the folder .* \\(its parent\\)"):
        LoraModel.from_pretrained(tiny_llama(), saved / "adapter_config.json")


def test_save_pretrained_onto_a_file_or_an_unwritable_place_is_one_error(tmp_path):
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    afile = tmp_path / "file"
    afile.write_text("mine")
    with pytest.raises(AdapterFileError, match="cannot write the adapter to"):
        lm.save_pretrained(afile)
    with pytest.raises(AdapterFileError, match="cannot write the adapter to"):
        lm.save_pretrained("/proc/loratune-adapter")
    assert afile.read_text() == "mine" and json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["file"]'
