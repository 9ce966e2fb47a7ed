"""analyze_adapter on adapters with known spectra, the recommendation, the plot, and resize_adapter (same rank
exact, shrinking = the best rank-k approximation, growing exact), with one-line errors."""

from __future__ import annotations

import dataclasses

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
from loratune.adapters.state import PREFIX
from loratune.compose import Adapter, load_adapter, save_adapter
from loratune.compose.plot import plot_analysis
from loratune.compose.rank import analyze_adapter, effective_rank, energy_rank, format_analysis, resize_adapter
from loratune.errors import LoraTuneError

from conftest import LLAMA_TARGETS, ids, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def known_spectrum(path: str, sv: list[float], shape=(64, 96), r: int = 8, alpha: float = 16.0, seed: int = 0):
    """A LoRA pair whose ΔW = s·B·A has exactly the singular values ``sv`` (padded with zeros to rank r)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=torch.float64))
    s = torch.tensor(sv + [0.0] * (r - len(sv)), dtype=torch.float64)
    scaling = alpha / r
    return {f"{PREFIX}{path}.lora_A.weight": v.T.contiguous(), f"{PREFIX}{path}.lora_B.weight": u * s / scaling}


def test_analyze_known_spectrum():
    sv = [8.0, 4.0, 2.0, 1.0]  # energies 64, 16, 4, 1 of 85: 90 % needs 2 (80/85 = 94 %), 99 % needs 4 (84/85 = 98.8 %)
    tensors = {**known_spectrum("model.layers.0.self_attn.q_proj", sv),
               **known_spectrum("model.layers.1.self_attn.q_proj", [1.0] * 8, seed=1),
               **known_spectrum("model.layers.0.self_attn.v_proj", [5.0], seed=2)}
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    a = analyze_adapter(Adapter(tensors, cfg, "known"))
    by = {m.path: m for m in a.modules}
    q0, q1, v0 = (by[f"model.layers.{p}"] for p in ("0.self_attn.q_proj", "1.self_attn.q_proj", "0.self_attn.v_proj"))
    assert q0.singular_values[:4] == pytest.approx(sv, rel=1e-10) and max(q0.singular_values[4:]) < 1e-12
    assert (q0.rank_90, q0.rank_99) == (2, 4)
    p = torch.tensor(sv, dtype=torch.float64) / sum(sv)
    assert q0.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert (q1.rank_90, q1.rank_99, q1.effective_rank) == (8, 8, pytest.approx(8.0))
    assert (v0.rank_90, v0.effective_rank, v0.norm) == (1, pytest.approx(1.0), pytest.approx(5.0))
    assert (q0.layer, q1.layer, q0.type) == (0, 1, "q_proj")
    # per type: q_proj needs 2 and 8 -> 8; v_proj needs 1 -> 1; overall the 90th percentile of [1, 2, 8] -> 8
    assert a.by_type == {"q_proj": 8, "v_proj": 1} and a.recommended_r == 8 and a.rank_pattern == {"v_proj": 1}
    assert a.saturated == ["model.layers.1.self_attn.q_proj"]
    text = format_analysis(a)
    assert "recommended r = 8" in text and "rank_pattern={'v_proj': 1}" in text


def test_energy_and_effective_rank_edges():
    assert energy_rank(torch.zeros(4), 0.9) == 0 and effective_rank(torch.zeros(4)) == 0.0
    assert energy_rank(torch.tensor([3.0, 0.0]), 0.99) == 1
    assert energy_rank(torch.tensor([1.0, 1.0, 1.0]), 0.9) == 3


def test_analyze_with_base_and_plot(tmp_path):
    base = tiny_llama()
    lm = model_with(base, {"a": LoraConfig(r=4, target_modules=["q_proj", "v_proj"])})
    adapter = adapters_of(lm, ["a"])[0]
    a = analyze_adapter(adapter, base.state_dict())
    for m in a.modules:
        d = deltas(adapter)[m.path]
        assert m.norm == pytest.approx(float(d.norm()), rel=1e-9)
        w0 = base.get_submodule(m.path).weight.detach().double()
        assert m.relative_norm == pytest.approx(float(d.norm() / w0.norm()))
        assert m.singular_values == pytest.approx(torch.linalg.svdvals(d)[:4].tolist(), rel=1e-8)
    plot_analysis(a, tmp_path / "spectra.png")
    assert (tmp_path / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LoraTuneError, match="no weight for module"):
        analyze_adapter(adapter, {})


@pytest.fixture(scope="module")
def adapter_r8():
    base = tiny_llama()
    lm = model_with(base, {"a": LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                           rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 4})})
    return base, adapters_of(lm, ["a"])[0]


def test_resize_same_rank_is_exact(adapter_r8):
    _, adapter = adapter_r8
    same, kept = resize_adapter(adapter, 8, {"v_proj": 4})
    assert max_rel(deltas(same), deltas(adapter)) < 1e-6 and min(kept.values()) == pytest.approx(1.0)
    assert same.config.r == 8 and same.config.lora_alpha == 16


def test_resize_shrinks_to_best_approximation(adapter_r8):
    _, adapter = adapter_r8
    small, kept = resize_adapter(adapter, 2)
    for path, d in deltas(adapter).items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        assert rel(deltas(small)[path], (u[:, :2] * s[:2]) @ vh[:2]) < 1e-5
        assert kept[path] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
    assert small.config.r == 2 and small.config.lora_alpha == 4 and small.config.rank_pattern == {}


def test_resize_grows_exactly_and_stays_trainable(adapter_r8, tmp_path):
    base, adapter = adapter_r8
    big, kept = resize_adapter(adapter, 12)
    assert max_rel(deltas(big), deltas(adapter)) < 1e-6 and min(kept.values()) == pytest.approx(1.0)
    save_adapter(big, tmp_path / "big")
    lm = LoraModel.from_pretrained(tiny_llama(), tmp_path / "big", is_trainable=True)
    layer = lm.model.get_submodule("model.layers.0.self_attn.v_proj")
    assert layer.adapters["default"].lora_A.shape == (12, 64)
    assert layer.adapters["default"].lora_A[4:].abs().sum() > 0  # the padded rows can train
    lm(input_ids=ids(), labels=ids()).loss.backward()
    assert layer.adapters["default"].lora_B.grad[:, 4:].abs().sum() > 0


def test_resize_rslora_keeps_alpha(tmp_path):
    lm = model_with(tiny_llama(), {"a": LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])})
    adapter = adapters_of(lm, ["a"])[0]
    out, _ = resize_adapter(adapter, 8)
    assert out.config.use_rslora and out.config.lora_alpha == 8
    assert max_rel(deltas(out), deltas(adapter)) < 1e-6
    back = load_adapter(save_adapter(out, tmp_path / "o") or tmp_path / "o")
    assert max_rel(deltas(back), deltas(adapter)) < 1e-6


def test_resize_errors(adapter_r8):
    _, adapter = adapter_r8
    for r, match in ((0, "whole number"), (65, "more than module")):
        with pytest.raises(LoraTuneError, match=match) as e:
            resize_adapter(adapter, r)
        assert "\n" not in str(e.value)
    broken = dataclasses.replace(adapter, tensors={k: v for k, v in adapter.tensors.items() if "lora_B" not in k})
    with pytest.raises(LoraTuneError, match="no lora_B"):
        resize_adapter(broken, 2)
