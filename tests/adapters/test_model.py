"""LoraModel on tiny Llama / GPT-2 / BERT: injection, training, merge, adapters, mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch

from loratune import BASE, ConfigError, LoraConfig, LoraLayer, LoraModel, LoraTuneError, get_lora_model
from loratune.adapters import ModulesToSave

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_bert_cls, tiny_gpt2


def _random_lora(model, name="default", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False, **kw)
    if isinstance(model, LoraModel):
        model.add_adapter(name, cfg)
        return model
    return get_lora_model(model, cfg, name)


def test_default_init_gives_base_logits(llama):
    x = ids()
    base = llama(input_ids=x).logits
    lm = get_lora_model(llama, LoraConfig(r=8, target_modules="all-linear"))
    out = lm(input_ids=x).logits
    with lm.disable_adapter():
        assert torch.equal(lm(input_ids=x).logits, out)  # B = 0: the LoRA term adds exactly nothing
    assert rel_err(out, base) < 1e-6  # the stock model, up to the fused norms' rounding (blocks.py)
    assert sum(1 for _ in lm.lora_layers()) == 14  # 7 projections × 2 layers; lm_head left alone
    assert not isinstance(lm.model.lm_head, LoraLayer)


def test_only_adapters_and_modules_to_save_train():
    model = tiny_bert_cls()
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = lm(input_ids=ids(4, 8), labels=torch.tensor([0, 1, 2, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in lm.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert all(".adapters." in n or ".copies." in n for n in trainable)
    assert any(".copies.default." in n for n in trainable) and any("lora_B" in n for n in trainable)
    # the frozen original head is untouched; the trained copy is what the model uses
    assert isinstance(lm.model.classifier, ModulesToSave)


def test_merge_unmerge_and_merge_and_unload(llama):
    x = ids()
    base = llama(input_ids=x).logits
    w0 = {n: p.detach().clone() for n, p in llama.named_parameters()}
    lm = _random_lora(llama)
    out = lm(input_ids=x).logits
    assert rel_err(out, base) > 1e-3  # the adapter does something
    lm.merge_adapter()
    assert rel_err(lm(input_ids=x).logits, out) <= 1e-5
    lm.unmerge_adapter()
    for n, p in lm.model.named_parameters():
        key = n.replace(".base_layer", "")
        if key in w0:
            torch.testing.assert_close(p, w0[key], rtol=0, atol=1e-6)
    plain = lm.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert rel_err(plain(input_ids=x).logits, out) <= 1e-5


def test_unload_gives_base_back(llama):
    x = ids()
    base = llama(input_ids=x).logits
    lm = _random_lora(llama)
    lm.merge_adapter()
    plain = lm.unload()
    assert rel_err(plain(input_ids=x).logits, base) <= 1e-6


def test_safe_merge_raises_on_nan(llama):
    lm = _random_lora(llama)
    layer = next(m for _, m in lm.lora_layers())
    with torch.no_grad():
        layer.adapters["default"].lora_A[0, 0] = float("nan")
    with pytest.raises(LoraTuneError, match="non-finite"):
        lm.merge_and_unload(safe_merge=True)


def test_disable_adapter_gives_base_and_restores_state(llama):
    x = ids()
    base = llama(input_ids=x).logits
    lm = _random_lora(llama)
    out = lm(input_ids=x).logits
    with lm.disable_adapter():
        assert rel_err(lm(input_ids=x).logits, base) <= 1e-6
    assert torch.equal(lm(input_ids=x).logits, out)
    lm.merge_adapter()
    with lm.disable_adapter():
        assert rel_err(lm(input_ids=x).logits, base) <= 1e-6
    assert all(layer.merged == ["default"] for _, layer in lm.lora_layers())
    assert rel_err(lm(input_ids=x).logits, out) <= 1e-5


def test_switching_adapters_restores_outputs(llama):
    x = ids()
    lm = _random_lora(llama, "one", seed=1)
    out_one = lm(input_ids=x).logits
    _random_lora(lm, "two", seed=2)
    assert lm.active_adapters == ["one"] and torch.equal(lm(input_ids=x).logits, out_one)
    lm.set_adapter("two")
    out_two = lm(input_ids=x).logits
    assert rel_err(out_two, out_one) > 1e-3
    lm.set_adapter("one")
    assert torch.equal(lm(input_ids=x).logits, out_one)
    lm.set_adapter("two")
    assert torch.equal(lm(input_ids=x).logits, out_two)
    # only the active adapter trains
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.two." in n for n in trainable)


def test_delete_adapter_removes_it_everywhere(llama):
    x = ids()
    base = llama(input_ids=x).logits
    lm = _random_lora(llama, "one", seed=1)
    _random_lora(lm, "two", seed=2)
    lm.delete_adapter("one")
    assert list(lm.peft_config) == ["two"] and lm.active_adapters == ["two"]
    assert not any("one" in layer.adapters for _, layer in lm.lora_layers())
    assert not any(".one." in n for n, _ in lm.named_parameters())
    lm.delete_adapter("two")
    assert not list(lm.lora_layers())
    assert rel_err(lm(input_ids=x).logits, base) <= 1e-6


def test_same_adapter_name_twice_is_an_error(llama):
    lm = _random_lora(llama)
    with pytest.raises(LoraTuneError, match="already exists"):
        _random_lora(lm, "default")
    assert all(list(layer.adapters) == ["default"] for _, layer in lm.lora_layers())


def test_no_match_lists_targetable_names(llama):
    with pytest.raises(ConfigError, match=r"matched no module.*q_proj"):
        get_lora_model(llama, LoraConfig(target_modules=["qproj"]))
    # nothing was wrapped by the failed attempt
    assert not any(isinstance(m, LoraLayer) for m in llama.modules())


def test_mixed_batch_rows_equal_single_adapter_outputs(llama):
    x = ids(batch=5)
    lm = _random_lora(llama, "one", seed=1)
    _random_lora(lm, "two", seed=2)
    rows = ["one", "two", BASE, "two", "one"]
    mixed = lm(input_ids=x, adapter_names=rows).logits
    with lm.disable_adapter():
        base = lm(input_ids=x).logits
    singles = {BASE: base}
    for name in ("one", "two"):
        lm.set_adapter(name)
        singles[name] = lm(input_ids=x).logits
    for i, name in enumerate(rows):
        assert rel_err(mixed[i], singles[name][i]) <= 1e-6
    with pytest.raises(LoraTuneError, match="one adapter name per row"):
        lm(input_ids=x, adapter_names=["one"])
    with pytest.raises(LoraTuneError, match="unknown adapter"):
        lm(input_ids=x, adapter_names=["nope"] * 5)


def test_mixed_batch_generate(llama):
    x = ids(batch=3, seq=5)
    lm = _random_lora(llama, "one", seed=1)
    _random_lora(lm, "two", seed=2)
    mixed = lm.generate(input_ids=x, adapter_names=["two", BASE, "one"], max_new_tokens=4, do_sample=False)
    lm.set_adapter("two")
    assert torch.equal(mixed[0], lm.generate(input_ids=x[:1], max_new_tokens=4, do_sample=False)[0])


def test_target_matching_rules(llama):
    lm = get_lora_model(copy.deepcopy(llama), LoraConfig(target_modules=r".*\.0\.self_attn\.(q|v)_proj"))
    assert sorted(n for n, _ in lm.lora_layers()) == ["model.layers.0.self_attn.q_proj",
                                                        "model.layers.0.self_attn.v_proj"]
    lm = get_lora_model(copy.deepcopy(llama), LoraConfig(target_modules=["self_attn.q_proj", "up_proj"],
                                                         exclude_modules=["model.layers.1.mlp.up_proj"]))
    assert sorted(n for n, _ in lm.lora_layers()) == ["model.layers.0.mlp.up_proj",
                                                        "model.layers.0.self_attn.q_proj",
                                                        "model.layers.1.self_attn.q_proj"]


def test_layers_to_transform_and_patterns(llama):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                     layers_pattern="layers", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})
    lm = get_lora_model(llama, cfg)
    layers = dict(lm.lora_layers())
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    q, v = layers["model.layers.1.self_attn.q_proj"].adapters["default"], \
        layers["model.layers.1.self_attn.v_proj"].adapters["default"]
    assert (q.r, q.scaling) == (4, 8.0) and (v.r, v.scaling) == (2, 4.0)
    assert tuple(v.lora_A.shape) == (2, 64)


def test_gpt2_conv1d_sets_fan_in_fan_out(gpt2):
    x = ids()
    torch.manual_seed(0)
    lm = get_lora_model(gpt2, LoraConfig(target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    assert lm.peft_config["default"].fan_in_fan_out
    out = lm(input_ids=x).logits
    lm.merge_adapter()
    assert rel_err(lm(input_ids=x).logits, out) <= 1e-5


def test_save_load_round_trip_is_bit_exact(tmp_path, llama):
    x = ids()
    lm = _random_lora(copy.deepcopy(llama), seed=3)
    out = lm(input_ids=x).logits
    lm.save_pretrained(tmp_path)
    torch.manual_seed(12345)  # another seed must not matter: everything comes from the file
    loaded = LoraModel.from_pretrained(copy.deepcopy(llama), tmp_path)
    for (n1, l1), (n2, l2) in zip(lm.lora_layers(), loaded.lora_layers()):
        assert n1 == n2
        assert torch.equal(l1.adapters["default"].lora_A, l2.adapters["default"].lora_A)
        assert torch.equal(l1.adapters["default"].lora_B, l2.adapters["default"].lora_B)
    assert torch.equal(loaded(input_ids=x).logits, out)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    trainable = LoraModel.from_pretrained(copy.deepcopy(llama), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == lm.get_nb_trainable_parameters()[0]


def test_save_several_adapters_and_load_adapter(tmp_path, llama):
    x = ids()
    lm = _random_lora(copy.deepcopy(llama), "default", seed=1)
    _random_lora(lm, "other", seed=2)
    lm.set_adapter("other")
    out_other = lm(input_ids=x).logits
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = LoraModel.from_pretrained(copy.deepcopy(llama), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter("other")
    assert torch.equal(loaded(input_ids=x).logits, out_other)


def test_print_trainable_parameters_format(capsys, llama):
    lm = get_lora_model(llama, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = lm.get_nb_trainable_parameters()
    # q: 64->64, v: 64->32 (2 kv heads of 16); 2 layers
    assert trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    lm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * trainable / total:.4f}")


def test_forward_passthrough_attributes(llama):
    lm = get_lora_model(llama, LoraConfig(target_modules=["q_proj"]))
    assert lm.config is llama.config
    assert lm.device == llama.device


def test_seq_cls_task_adds_head_to_modules_to_save():
    lm = get_lora_model(tiny_bert_cls(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(lm.model.classifier, ModulesToSave)
    assert "classifier" in lm.peft_config["default"].modules_to_save


def test_gpt2_forward_after_training_step_matches_merged():
    model = tiny_gpt2()
    lm = get_lora_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    lm.train()
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    x = ids(2, 8)
    lm(input_ids=x, labels=x).loss.backward()
    opt.step()
    lm.eval()
    out = lm(input_ids=x).logits
    merged = lm.merge_and_unload()
    assert rel_err(merged(input_ids=x).logits, out) <= 1e-5
