"""extract_lora: a model merged from a known rank-r adapter gives that ΔW back (Linear and GPT-2 Conv1D), a
dense difference gives its best rank-r approximation, changes outside the targets are reported, bad input is one
line."""

from __future__ import annotations

import copy

import pytest
import torch
from compose_fixtures import (
    adapters_of,
    deltas,
    max_rel,
    model_with,
    rel,
)

from loratune import LoraConfig, LoraModel
from loratune.compose import save_adapter
from loratune.compose.extract import extract_lora
from loratune.errors import LoraTuneError

from conftest import LLAMA_TARGETS, ids, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("make, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_extract_recovers_merged_adapter(make, targets, tmp_path):
    base = make()
    lm = model_with(base, {"a": LoraConfig(r=4, lora_alpha=8, target_modules=targets)}, seed=3)
    adapter = adapters_of(lm, ["a"])[0]
    merged = copy.deepcopy(lm).merge_and_unload()
    out, report = extract_lora(base, merged, r=4)
    assert max_rel(deltas(out), deltas(adapter)) < 1e-5  # the fp32 rounding of W + ΔW is all that is lost
    assert min(report.energy_kept.values()) > 1 - 1e-9 and not report.not_captured
    save_adapter(out, tmp_path / "x")
    x = ids()
    again = LoraModel.from_pretrained(make(), tmp_path / "x")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=x).logits, merged(x).logits, atol=1e-4)


def test_extract_dense_difference_is_best_rank_r():
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in tuned.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not tuned.lm_head:
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 0.01)
        tuned.model.norm.weight.mul_(1.5)  # not a Linear: reported, not captured
    out, report = extract_lora(base, tuned, r=3, lora_alpha=6)
    assert out.config.r == 3 and out.config.lora_alpha == 6
    for path, d in deltas(out).items():
        diff = tuned.get_submodule(path).weight.detach().double() - base.get_submodule(path).weight.detach().double()
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        assert rel(d, (u[:, :3] * s[:3]) @ vh[:3]) < 1e-6  # float32 factors
        assert report.energy_kept[path] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()))
    assert list(report.not_captured) == ["model.norm.weight"]
    assert report.not_captured["model.norm.weight"] == pytest.approx(0.5)
    assert "not captured" in report.summary()


def test_extract_only_targets_and_skips_unchanged():
    base = tiny_llama()
    lm = model_with(base, {"a": LoraConfig(r=2, target_modules=["q_proj"])})
    merged = copy.deepcopy(lm).merge_and_unload()
    out, report = extract_lora(base, merged, r=2, target_modules=["q_proj", "v_proj"])
    assert sorted(p.rsplit(".", 1)[-1] for p in deltas(out)) == ["q_proj", "q_proj"]
    assert len(report.unchanged) == 2  # the v_proj modules


def test_extract_errors():
    base = tiny_llama()
    with pytest.raises(LoraTuneError, match="no targeted module differs"):
        extract_lora(base, copy.deepcopy(base), r=2)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(LoraTuneError, match="more than module"):
        extract_lora(base, tuned, r=65)
    with pytest.raises(LoraTuneError, match="whole number"):
        extract_lora(base, tuned, r=0)
    with pytest.raises(LoraTuneError, match="same architecture") as e:
        extract_lora(base, tiny_llama(layers=1), r=2)
    assert "\n" not in str(e.value)
