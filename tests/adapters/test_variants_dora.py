"""DoRA (adapters/variants/dora.py) against its paper's formula in float64, merging, files and PEFT both ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune import LoraConfig, LoraModel, get_lora_model, settings
from loratune.adapters import merged_state_dict, variants
from loratune.errors import ConfigError, LoraTuneError

from conftest import LLAMA_TARGETS, TinyConvNet, ids, rel_err, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def dora_reference(x, W, b, A, B, m, s):
    """The paper's W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row (norm detached), applied to x: float64, from scratch."""
    V = W + s * (B @ A)
    norm = torch.linalg.vector_norm(V, dim=1).detach()
    out = x @ ((m / norm)[:, None] * V).T
    return out + b if b is not None else out


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.f = layer

    def forward(self, x):
        return self.f(x)


def randomize(lm, name="default", seed=3):
    """A trained-looking adapter: random B and a magnitude moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            ad = layer.adapters[name]
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g, dtype=ad.lora_B.dtype) * 0.1)
            ad.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(ad.lora_magnitude_vector.shape, generator=g,
                                                               dtype=ad.lora_B.dtype))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_and_grads_equal_the_paper_formula_float64(kind, fused):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double() if kind == "linear" else Conv1D(10, 12).double()
    lm = get_lora_model(Net(base), LoraConfig(r=3, lora_alpha=6, target_modules=["f"], use_dora=True))
    randomize(lm)
    layer = lm.model.f
    ad = layer.adapters["default"]
    W = (base.weight.T if kind == "conv1d" else base.weight).detach()
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    with settings.override(fused=fused):
        out = lm(x)
        g_out = torch.randn_like(out)
        out.backward(g_out)
    A = ad.lora_A.detach().clone().requires_grad_()
    B = ad.lora_B.detach().clone().requires_grad_()
    m = ad.lora_magnitude_vector.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = dora_reference(x2, W, base.bias.detach(), A, B, m, ad.scaling)
    ref.backward(g_out)
    assert rel_err(out, ref) < 1e-12
    for got, want in [(ad.lora_A.grad, A.grad), (ad.lora_B.grad, B.grad), (ad.lora_magnitude_vector.grad, m.grad),
                      (x.grad, x2.grad)]:
        assert rel_err(got, want) < 1e-10
    assert base.weight.grad is None and not base.weight.requires_grad


def test_norm_is_computed_without_forming_the_sum():
    torch.manual_seed(1)
    W, A, B = torch.randn(40, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64), \
        torch.randn(40, 4, dtype=torch.float64)
    want = torch.linalg.vector_norm(W + 0.7 * B @ A, dim=1)
    assert rel_err(variants.row_norms(W, A, B, 0.7), want) < 1e-13
    assert rel_err(variants.dense_row_norms(W, A, B, 0.7), want) < 1e-13


def test_magnitude_starts_at_the_row_norms_and_output_at_the_base():
    model = tiny_llama()
    x = ids()
    before = model(x).logits
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
    q = lm.model.model.layers[0].self_attn.q_proj
    assert torch.allclose(q.adapters["default"].lora_magnitude_vector, q.weight.norm(dim=1), rtol=1e-6)
    assert rel_err(lm(x).logits, before) < 1e-6


def test_only_magnitude_and_factors_train_and_the_norm_is_detached():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                 init_lora_weights=False))
    trainable = sorted({n.rsplit(".", 1)[-1] for n, p in lm.named_parameters() if p.requires_grad})
    assert trainable == ["lora_A", "lora_B", "lora_magnitude_vector"]
    lm.train()
    lm(ids()).logits.square().mean().backward()
    q = lm.model.model.layers[0].self_attn.q_proj
    ad = q.adapters["default"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (ad.lora_A, ad.lora_B, ad.lora_magnitude_vector))
    assert all(p.grad is None for n, p in lm.named_parameters() if not p.requires_grad)


def test_plan_says_dora_and_several_adapters_follow_peft():
    torch.manual_seed(0)
    lm = get_lora_model(Net(nn.Linear(8, 6).double()), LoraConfig(r=2, target_modules=["f"], use_dora=True))
    randomize(lm)
    layer = lm.model.f
    assert layer.plan(torch.randn(2, 8, dtype=torch.float64)).path == "reference"
    assert "dora" in layer.plan(torch.randn(2, 8, dtype=torch.float64)).reason
    lm.add_adapter("plain", LoraConfig(r=2, target_modules=["f"], init_lora_weights=False))
    lm.set_adapter(["plain", "default"])  # PEFT: plain term first, then DoRA's on top of that result
    x = torch.randn(3, 8, dtype=torch.float64)
    p, d = layer.adapters["plain"], layer.adapters["default"]
    W, b = layer.weight, layer.base_layer.bias
    result = F.linear(x, W, b) + p.scaling * x @ p.lora_A.T @ p.lora_B.T
    g = d.lora_magnitude_vector / torch.linalg.vector_norm(W + d.scaling * d.lora_B @ d.lora_A, dim=1)
    want = result + (g - 1) * (result - b) + g * d.scaling * (x @ d.lora_A.T @ d.lora_B.T)
    assert rel_err(lm(x), want) < 1e-12


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_equals_unmerged_and_unmerge_restores(make):
    model = make()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    targets = LLAMA_TARGETS if make is tiny_llama else ["c_attn", "c_proj", "c_fc"]
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                          use_rslora=True))
    randomize(lm)
    x = ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = lm(x).logits
    lm.merge_adapter()
    assert rel_err(lm(x).logits, unmerged) < 1e-5
    lm.unmerge_adapter()
    assert rel_err(lm(x).logits, unmerged) < 1e-6
    after = model.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) < 1e-5
    sd = merged_state_dict(plain, _file_tensors(lm), lm.peft_config["default"])
    merged = lm.merge_and_unload()
    for k, v in merged.state_dict().items():
        assert torch.allclose(sd[k], v, atol=1e-5), k


def _file_tensors(lm):
    from loratune.adapters.state import adapter_tensors

    return {k: v.detach().clone() for k, v in adapter_tensors(lm.model, lm.peft_config["default"], "default").items()}


def test_save_load_round_trip_in_peft_format(tmp_path):
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
    randomize(lm)
    x = ids()
    want = lm(x).logits
    lm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    mags = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 14 and keys[mags[0]].dim() == 1
    back = LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert back.peft_config["default"].use_dora is True
    assert rel_err(back(x).logits, want) < 1e-6


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_peft_loads_ours_and_we_load_peft_fp32(make, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"] if make is tiny_llama else ["c_attn", "c_fc"]
    x = ids()
    lm = get_lora_model(make(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    randomize(lm)
    ours = lm(x).logits
    lm.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()(x).logits
    assert rel_err(theirs, ours) < 1e-5

    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                     fan_in_fan_out=make is tiny_gpt2))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    with torch.no_grad():
        want = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    back = LoraModel.from_pretrained(make(), tmp_path / "peft")
    assert rel_err(back(x).logits, want) < 1e-5


def test_one_training_step_has_peft_dora_gradients():
    """One training step's gradients equal PEFT's (no dropout: the two DoRA forms are then one function)."""
    x = ids()
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "up_proj"], use_dora=True,
                                                 init_lora_weights=False))
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                                           use_dora=True))
    ours = dict(_file_tensors(lm))
    peft.set_peft_model_state_dict(pm, ours)
    lm.train(), pm.train()
    lm(input_ids=x, labels=x).loss.backward()
    pm(input_ids=x, labels=x).loss.backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for key, p in _live(lm).items():
        peft_name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight").replace(".lora_magnitude_vector",
                                                                ".lora_magnitude_vector.default.weight")
        assert rel_err(p.grad, theirs[peft_name]) < 1e-4, key


def _live(lm):
    from loratune.adapters.state import adapter_tensors

    return adapter_tensors(lm.model, lm.peft_config["default"], "default")


@pytest.mark.parametrize("target", [["embed_tokens"], ["conv1"], ["conv3"]])
def test_unsupported_layers_are_refused_in_one_line_and_the_model_is_untouched(target):
    model = tiny_llama() if target == ["embed_tokens"] else TinyConvNet()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError) as e:
        get_lora_model(model, LoraConfig(r=2, target_modules=target + (["q_proj"] if target == ["embed_tokens"]
                                                                       else ["head"]), use_dora=True))
    msg = str(e.value)
    assert "\n" not in msg and "use_dora supports Linear and Conv1D" in msg and "use_dora: false" in msg
    assert [n for n, _ in model.named_modules()] == names  # nothing was wrapped


def test_mixed_batches_refuse_dora_in_one_line():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LoraTuneError, match="mixed-adapter batches do not support dora"):
        lm(ids(), adapter_names=["default", "__base__"])


def test_config_fields_validate_and_round_trip():
    with pytest.raises(ConfigError, match="use_dora must be true or false"):
        LoraConfig(target_modules=["q"], use_dora="yes")
    cfg = LoraConfig(target_modules=["q"], use_dora=True)
    d = cfg.to_dict()
    assert d["use_dora"] is True and LoraConfig.from_dict(d).use_dora is True


def test_half_precision_base_keeps_fp32_adapters_and_matches_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    lm = get_lora_model(Net(base), LoraConfig(r=4, target_modules=["f"], use_dora=True))
    randomize(lm)
    ad = lm.model.f.adapters["default"]
    assert ad.lora_magnitude_vector.dtype == torch.float32
    x = torch.randn(5, 16).to(torch.bfloat16)
    out = lm(x)
    assert out.dtype == torch.bfloat16
    want = dora_reference(x.double(), base.weight.double(), base.bias.double(), ad.lora_A.double(),
                          ad.lora_B.double(), ad.lora_magnitude_vector.double(), ad.scaling)
    assert rel_err(out, want) < 2e-2


def test_the_norm_follows_every_change_of_the_factors():
    """The cached norm is keyed on tensor versions: an optimizer step, a load or a merge elsewhere changes it."""
    torch.manual_seed(0)
    lm = get_lora_model(Net(nn.Linear(8, 6).double()), LoraConfig(r=2, target_modules=["f"], use_dora=True,
                                                                  init_lora_weights=False))
    layer, x = lm.model.f, torch.randn(3, 8, dtype=torch.float64)
    ad = layer.adapters["default"]

    def ref():
        return dora_reference(x, layer.weight, layer.base_layer.bias, ad.lora_A, ad.lora_B,
                              ad.lora_magnitude_vector, ad.scaling)

    assert rel_err(lm(x), ref()) < 1e-12
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        lm(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert rel_err(lm(x), ref()) < 1e-12
    with torch.no_grad():
        layer.weight.mul_(1.5)  # the base changed in place (e.g. another adapter merged)
    assert rel_err(lm(x), ref()) < 1e-12
