"""A LoRA adapter from a fully fine-tuned (or merged) model: per targeted module, the truncated SVD of
W_tuned − W_base, with the share of each difference's energy the rank keeps.

Targets are Linear and GPT-2 Conv1D modules (by default every one but the output head, as "all-linear");
weights that changed elsewhere (embeddings, norms, biases, the head) cannot be held by a LoRA of those modules and
are listed in the report instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.config import LoraConfig
from ..adapters.factors import Adapter, Pair, energy_kept, to_adapter, truncate
from ..adapters.targets import all_linear_targets, name_matches
from ..errors import ConfigError, LoraTuneError


@dataclass
class ExtractReport:
    """Energy of W_tuned − W_base kept per extracted module, modules left out because they did not change, and
    the other changed tensors (name -> ‖ΔW‖/‖W0‖) that the adapter cannot hold."""

    energy_kept: dict[str, float] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    not_captured: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        e = list(self.energy_kept.values())
        text = (f"{len(e)} modules extracted; energy kept: mean {100 * sum(e) / len(e):.2f} %, "
                f"min {100 * min(e):.2f} %")
        if self.unchanged:
            text += f"; {len(self.unchanged)} targeted module(s) unchanged (left out)"
        if self.not_captured:
            worst = max(self.not_captured, key=self.not_captured.get)
            text += (f"; {len(self.not_captured)} other changed tensor(s) not captured by LoRA (largest "
                     f"relative change {self.not_captured[worst]:.3g} in {worst})")
        return text


def extract_lora(base_model: nn.Module, tuned_model: nn.Module, r: int, lora_alpha: float | None = None,
                 target_modules: list[str] | str | None = None, dtype: torch.dtype = torch.float32,
                 name: str = "extracted") -> tuple[Adapter, ExtractReport]:
    """A rank-``r`` LoRA adapter with ΔW ≈ W_tuned − W_base for each targeted module, and the report.

    ``target_modules``: as LoraConfig's (a list of names or dotted suffixes, or a regex); None is every
    Linear/Conv1D but the output head. ``lora_alpha`` defaults to ``r`` (scaling 1); the factors hold the
    difference exactly at any α. The best rank-r approximation (Eckart–Young), computed in float64."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"r must be a whole number ≥ 1, got {r!r}")
    alpha = float(lora_alpha if lora_alpha is not None else r)
    if alpha <= 0:
        raise ConfigError(f"lora_alpha must be positive, got {lora_alpha!r}")
    targets = target_modules if target_modules is not None else all_linear_targets(base_model)
    tuned = dict(tuned_model.named_modules())
    report, pairs = ExtractReport(), {}
    covered = set()
    for path, module in base_model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or not path or not name_matches(path, targets):
            continue
        other = tuned.get(path)
        if other is None or other.weight.shape != module.weight.shape:
            shape = "missing" if other is None else f"{tuple(other.weight.shape)}"
            raise LoraTuneError(f"the tuned model's module {path!r} is {shape} where the base has "
                                f"{tuple(module.weight.shape)}; give a tuned model of the same architecture")
        covered.add(path + ".weight")
        diff = other.weight.detach().double() - module.weight.detach().double()
        if not torch.any(diff):
            report.unchanged.append(path)
            continue
        conv1d = isinstance(module, Conv1D)
        m = diff.T if conv1d else diff  # (out, in)
        if r > min(m.shape):
            raise ConfigError(f"r={r} is more than module {path!r} allows (its weight is {m.shape[0]}×{m.shape[1]}, "
                              f"rank ≤ {min(m.shape)}); use r ≤ {min(m.shape)} or leave the module out")
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        b, a = truncate(u, s, vh, r)
        scaling = alpha / r
        pairs[path] = Pair(path, "linear", a, b / scaling, scaling, fan_in_fan_out=conv1d)
        report.energy_kept[path] = energy_kept(s, r)
    if not pairs:
        raise LoraTuneError("no targeted module differs between the base and the tuned model; is the tuned model "
                            "really fine-tuned from this base (or do target_modules name its changed layers)?")
    base_params = dict(base_model.named_parameters())
    for pname, p in tuned_model.named_parameters():
        q = base_params.get(pname)
        if pname in covered or q is None or q.shape != p.shape:
            continue
        d = float((p.detach().double() - q.detach().double()).norm())
        if d > 0:
            report.not_captured[pname] = d / max(float(q.detach().double().norm()), 1e-30)
    base_name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None
    template = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(pairs), base_model_name_or_path=base_name,
                          fan_in_fan_out=any(p.fan_in_fan_out for p in pairs.values()),
                          task_type="CAUSAL_LM" if type(base_model).__name__.endswith("ForCausalLM") else None)
    return to_adapter(pairs, template, name, dtype=dtype), report
