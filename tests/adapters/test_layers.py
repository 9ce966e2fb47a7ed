"""Each LoRA layer kind against a plain float64 reference: W0·x + s·B·A·x, ΔW, merge/unmerge."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune.adapters import functional as LF
from loratune.adapters.layers import Conv1DLora, ConvLora, EmbeddingLora, LinearLora, lora_class_for
from loratune.errors import LoraTuneError


def _layer(cls, base, r=4, alpha=8, init=False, dropout=0.0, rslora=False):
    layer = cls(base)
    layer.add_adapter("a", r=r, lora_alpha=alpha, dropout=dropout, use_rslora=rslora, init=init)
    return layer


def _cases():
    torch.manual_seed(0)
    return [
        (LinearLora, nn.Linear(12, 10).double(), lambda: torch.randn(3, 5, 12, dtype=torch.float64)),
        (Conv1DLora, Conv1D(10, 12).double(), lambda: torch.randn(3, 5, 12, dtype=torch.float64)),
        (EmbeddingLora, nn.Embedding(20, 6, padding_idx=0).double(), lambda: torch.randint(0, 20, (3, 5))),
        (ConvLora, nn.Conv2d(3, 6, 3, padding=1, stride=2).double(),
         lambda: torch.randn(2, 3, 9, 9, dtype=torch.float64)),
        (ConvLora, nn.Conv1d(3, 6, 1).double(), lambda: torch.randn(2, 3, 9, dtype=torch.float64)),
        (ConvLora, nn.Conv3d(2, 4, 2).double(), lambda: torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)),
    ]


def _reference_weight(layer):
    """W0 + ΔW from first principles, in the base layer's own weight layout."""
    ad, w0 = layer.adapters["a"], layer.base_layer.weight
    A, B, s = ad.lora_A, ad.lora_B, ad.scaling
    if isinstance(layer, Conv1DLora):
        return w0 + s * (B @ A).T
    if isinstance(layer, LinearLora):
        return w0 + s * B @ A
    if isinstance(layer, EmbeddingLora):
        return w0 + s * (B @ A).T
    # conv: the LoRA path is conv(A) followed by a 1×…×1 conv(B) -> kernel sum_r B[o,r] A[r,...]
    return w0 + s * torch.tensordot(B.flatten(1), A, dims=([1], [0]))


def _functional(layer, x, weight):
    base = copy.deepcopy(layer.base_layer)
    base.weight.data = weight.detach()
    return base(x)


@pytest.mark.parametrize("case", range(6))
def test_forward_matches_float64_reference(case):
    cls, base, make_x = _cases()[case]
    layer = _layer(cls, base)
    x = make_x()
    torch.testing.assert_close(layer(x), _functional(layer, x, _reference_weight(layer)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", range(6))
def test_default_init_gives_base_output_exactly(case):
    cls, base, make_x = _cases()[case]
    layer = _layer(cls, copy.deepcopy(base), init=True)
    x = make_x()
    assert torch.equal(layer(x), base(x))
    layer = _layer(cls, copy.deepcopy(base), init="gaussian")
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("case", range(6))
def test_merge_equals_unmerged_and_unmerge_restores(case):
    cls, base, make_x = _cases()[case]
    layer = _layer(cls, base)
    x = make_x()
    w0 = layer.base_layer.weight.detach().clone()
    expected_w = _reference_weight(layer).detach()
    before = layer(x)
    layer.merge()
    assert layer.merged == ["a"]
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.base_layer.weight.detach(), expected_w, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)


def test_second_merge_warns_and_changes_nothing():
    layer = _layer(LinearLora, nn.Linear(8, 8))
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w)


def test_safe_merge_refuses_nan():
    layer = _layer(LinearLora, nn.Linear(8, 8))
    w = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.adapters["a"].lora_B[0, 0] = float("nan")
    with pytest.raises(LoraTuneError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w) and layer.merged == []


def test_rslora_scaling():
    assert LF.lora_scaling(16, 4) == 4.0
    assert LF.lora_scaling(16, 4, use_rslora=True) == 8.0
    layer = _layer(LinearLora, nn.Linear(8, 8), r=16, alpha=8, rslora=True)
    assert layer.adapters["a"].scaling == pytest.approx(8 / math.sqrt(16))


def test_dropout_is_inverted_dropout_on_the_lora_input_only():
    torch.manual_seed(0)
    base = nn.Linear(64, 64, bias=False)
    layer = _layer(LinearLora, base, dropout=0.5).train()
    x = torch.ones(2000, 64)
    delta = layer(x) - base(x)
    ad = layer.adapters["a"]
    full = LF.lora_linear_reference(x, ad.lora_A, ad.lora_B, ad.scaling)
    # The mean over many rows of the dropped-out term is the full term (inverted dropout keeps expectation).
    torch.testing.assert_close(delta.mean(0), full.mean(0), rtol=0.1, atol=0.05)
    layer.eval()
    torch.testing.assert_close(layer(x) - base(x), full)


def test_only_adapter_parameters_get_gradients():
    layer = _layer(LinearLora, nn.Linear(8, 8))
    layer.base_layer.requires_grad_(False)
    layer(torch.randn(4, 8)).sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.adapters["a"].lora_A.grad is not None and layer.adapters["a"].lora_B.grad is not None


def test_registry_maps_types():
    assert lora_class_for(nn.Linear(2, 2)) is LinearLora
    assert lora_class_for(Conv1D(2, 2)) is Conv1DLora
    assert lora_class_for(nn.Embedding(2, 2)) is EmbeddingLora
    assert lora_class_for(nn.Conv2d(2, 2, 1)) is ConvLora
    assert lora_class_for(nn.LayerNorm(2)) is None


def test_grouped_conv_is_a_clear_error():
    with pytest.raises(LoraTuneError, match="grouped"):
        _layer(ConvLora, nn.Conv2d(4, 4, 3, groups=2))


def test_merging_into_a_bf16_weight_rounds_once_and_unmerge_restores_it():
    torch.manual_seed(0)
    base = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = LinearLora(base)
    layer.add_adapter("a", r=4, lora_alpha=8, dropout=0.0, use_rslora=False, init=False)  # fp32 adapter, random A, B
    delta = layer.delta_weight("a").detach().float()
    layer.merge(["a"])
    want = (w0.float() + delta).to(torch.bfloat16)  # ΔW added in fp32, one rounding
    assert torch.equal(layer.weight, want)
    twice = w0 + delta.to(torch.bfloat16)  # the old order: ΔW rounded to bf16, then added in bf16
    assert not torch.equal(twice, want)  # (so the test can tell the two apart)
    layer.unmerge()
    assert (layer.weight.float() - w0.float()).abs().max() <= 2 * w0.float().abs().max() * 2**-8
