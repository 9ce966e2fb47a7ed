"""Weighted combinations of LoRA adapters: PEFT's ``add_weighted_adapter`` modes as a pure function of adapters
(``combine_adapters``), and the same on a live model (``add_weighted_adapter``, behind
``LoraModel.add_weighted_adapter``). ``loratune.compose`` (directories, CLI, rank tools) builds on this module.

Modes (PEFT's names and definitions):

- ``cat``: exact. Each module's factors are stacked: A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...], so
  ΔW = Σ wᵢ·ΔWᵢ and the rank is Σ rᵢ.
- ``svd``: Σ wᵢ·ΔWᵢ, then its best rank-``svd_rank`` approximation (the energy kept is reported per module).
- ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the ΔWᵢ merged with TIES / DARE /
  magnitude pruning (``tensor_ops``), then truncated by SVD as ``svd``.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's factor-wise modes, for adapters
  of one rank: the A factors are merged with weights sign(wᵢsᵢ)·√|wᵢsᵢ| and the B factors with √|wᵢsᵢ|, each on
  its own. ΔW is then (Σ√·Bᵢ)(Σ√·Aᵢ), which has cross terms Bᵢ·Aⱼ: NOT Σ wᵢ·ΔWᵢ. Use ``cat`` or ``svd`` for that.

Each ΔWᵢ carries its own adapter's scaling (rsLoRA, ``alpha_pattern`` and ``rank_pattern`` included); the result
stores its factors for scaling 1 and says so in its config (``use_rslora=False``, α = r per module). PEFT instead
copies ``use_rslora`` from the first adapter, so a combination of rsLoRA adapters comes out √r too strong
(huggingface/peft#3761). Two further differences from PEFT: one adapter is combined by the mode asked for (PEFT
switches to ``linear``), and an ``adapter_name`` that exists is an error (PEFT returns silently). DoRA adapters
(``use_dora``) are refused until loratune has the variant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, LoraTuneError, closest
from . import state
from .factors import Adapter, Pair, energy_kept, lora_pairs, low_rank_svd, to_adapter, truncate
from .merge_ops import SIGN_METHODS, combine_tensors

FACTOR_MODES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTA_MODES = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear",
               "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}
COMBINATION_TYPES = ("cat", *DELTA_MODES, *FACTOR_MODES)
_PRUNING = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


@dataclass
class CombineReport:
    """What a combination did: the mode, each module's rank and, for the SVD modes, the share of the merged ΔW's
    energy (Σσ²) that the truncation kept."""

    combination_type: str
    ranks: dict[str, int] = field(default_factory=dict)
    energy_kept: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: modules, ranks and the energy kept (min and mean) where the mode truncates."""
        ranks = sorted(set(self.ranks.values()))
        text = (f"{self.combination_type}: {len(self.ranks)} modules, rank "
                + (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"))
        if self.energy_kept:
            e = list(self.energy_kept.values())
            worst = min(self.energy_kept, key=self.energy_kept.get)
            text += (f"; energy kept: mean {100 * sum(e) / len(e):.2f} %, min {100 * min(e):.2f} % ({worst})")
        return text


def combine_adapters(adapters: Sequence[Adapter], weights: Sequence[float], combination_type: str = "svd",
                     svd_rank: int | None = None, density: float | None = None,
                     majority_sign_method: str = "total", seed: int | None = None,
                     svd_clamp: float | None = None, allow_partial: bool = False, check_base: bool = True,
                     name: str = "combined") -> tuple[Adapter, CombineReport]:
    """One adapter from ``adapters`` weighted by ``weights`` (see the module docstring for the modes).

    ``density`` (in (0, 1]) is required by the pruning modes, ``svd_rank`` (default: the largest rank among the
    adapters, capped per module at min(out, in)) and ``svd_clamp`` (PEFT's quantile clamp) apply to the SVD modes,
    ``seed`` makes the DARE modes' random drops reproducible (None: torch's global generator, as PEFT).
    Adapters must target the same modules of one base unless ``allow_partial`` (a module an adapter lacks counts
    as ΔW = 0 there, as PEFT does) or, for adapters that name different bases, ``check_base=False``."""
    _check_args(adapters, weights, combination_type, svd_rank, density, majority_sign_method, svd_clamp)
    all_pairs = [lora_pairs(a, allow_other=False) for a in adapters]
    order = _check_modules(adapters, all_pairs, allow_partial, check_base)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    default_rank = max(p.rank for pairs in all_pairs for p in pairs.values())
    report = CombineReport(combination_type)
    out: dict[str, Pair] = {}
    for path in order:
        present = [(w, pairs[path]) for w, pairs in zip(weights, all_pairs) if path in pairs]
        if combination_type == "cat":
            pair = _cat(present)
        elif combination_type in FACTOR_MODES:
            pair = _factor_wise(combination_type, present, density, majority_sign_method, generator)
        else:
            pair, kept = _via_svd(combination_type, present, svd_rank, default_rank, density,
                                  majority_sign_method, generator, svd_clamp)
            report.energy_kept[path] = kept
        out[path] = pair
        report.ranks[path] = pair.rank
    template = adapters[0].config
    base = next((a.config.base_model_name_or_path for a in adapters if a.config.base_model_name_or_path), None)
    result = to_adapter(out, template, name, dtype=adapters[0].tensors[next(iter(adapters[0].tensors))].dtype,
                        use_rslora=False, base_model_name_or_path=base)
    return result, report


def _cat(present: list[tuple[float, Pair]]) -> Pair:
    first = present[0][1]
    a = torch.cat([p.A.double() * (w * p.scaling) for w, p in present], 0)
    b = torch.cat([p.B.double() for _, p in present], 1)
    return Pair(first.path, first.kind, a, b, 1.0, first.fan_in_fan_out)


def _factor_wise(method: str, present, density, sign_method, generator) -> Pair:
    first = present[0][1]
    ranks = sorted({p.rank for _, p in present})
    if len(ranks) > 1:
        raise ConfigError(f"combination_type {method!r} merges the A and B factors entry by entry and needs one "
                          f"rank, but module {first.path!r} has ranks {ranks}; use 'cat', 'svd' or "
                          f"'{method}_svd' (which work on ΔW)")
    ws = [w * p.scaling for w, p in present]
    w_a = [math.copysign(math.sqrt(abs(w)), w) for w in ws]  # the sign on A only: PEFT's convention
    w_b = [math.sqrt(abs(w)) for w in ws]
    a = combine_tensors(method, [p.A.double() for _, p in present], w_a, density, sign_method, generator)
    b = combine_tensors(method, [p.B.double() for _, p in present], w_b, density, sign_method, generator)
    return Pair(first.path, first.kind, a, b, 1.0, first.fan_in_fan_out)


def _via_svd(mode: str, present, svd_rank, default_rank, density, sign_method, generator, clamp
             ) -> tuple[Pair, float]:
    first = present[0][1]
    cap = first.max_rank
    if svd_rank is not None and svd_rank > cap:
        raise ConfigError(f"svd_rank={svd_rank} is more than module {first.path!r} allows (its ΔW is "
                          f"{first.B.shape[0]}×{first.A[0].numel()}, rank ≤ {cap}); use svd_rank ≤ {cap}")
    rank = svd_rank or min(default_rank, cap)
    method = DELTA_MODES[mode]
    if method == "linear":  # Σ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ ...] @ [A₁; ...]: an exact SVD without forming ΔW
        b = torch.cat([p.factors64()[0] * w for w, p in present], 1)
        a = torch.cat([p.factors64()[1] for _, p in present], 0)
        u, s, vh = low_rank_svd(b, a)
    else:  # merged in the base weight's layout, where PEFT draws its masks
        merged = combine_tensors(method, [p.weight_layout(p.matrix()) for _, p in present], [w for w, _ in present],
                                 density, sign_method, generator)
        u, s, vh = torch.linalg.svd(first.matrix_layout(merged), full_matrices=False)
    b, a = truncate(u, s, vh, rank)
    if clamp is not None:  # PEFT's svd_clamp: clip both factors at the clamp-quantile of their entries
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return first.from_factors(b, a), energy_kept(s, rank)


def _check_args(adapters, weights, mode, svd_rank, density, sign_method, clamp) -> None:
    if not adapters:
        raise ConfigError("no adapters to combine; give at least one")
    if mode not in COMBINATION_TYPES:
        raise ConfigError(f"unknown combination_type {mode!r}{closest(mode, COMBINATION_TYPES)}")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s); give one weight per adapter")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"weights must be finite numbers, got {bad[0]!r}; e.g. weights=[0.7, 0.3]")
    prunes = DELTA_MODES.get(mode, mode) in _PRUNING
    if prunes and density is None:
        raise ConfigError(f"combination_type {mode!r} needs density, the fraction of entries kept in (0, 1]; "
                          "e.g. density=0.5")
    if density is not None:
        if not prunes:
            raise ConfigError(f"density applies to the ties, dare and magnitude_prune modes, not {mode!r}; drop it")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1] (the fraction of entries kept), got {density!r}; "
                              "e.g. density=0.5")
    if sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method must be one of {SIGN_METHODS}, got {sign_method!r}")
    if (svd_rank is not None or clamp is not None) and mode not in DELTA_MODES:
        raise ConfigError(f"svd_rank and svd_clamp apply to the SVD modes ({', '.join(DELTA_MODES)}), not "
                          f"{mode!r}; drop them or pick an SVD mode")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ConfigError(f"svd_rank must be a whole number ≥ 1, got {svd_rank!r}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and 0 < clamp <= 1):
        raise ConfigError(f"svd_clamp must be a quantile in (0, 1], got {clamp!r}; e.g. svd_clamp=0.99")


def _check_modules(adapters, all_pairs, allow_partial: bool, check_base: bool) -> list[str]:
    """The union of the adapters' modules, in order of first appearance, once they are known to fit together."""
    if check_base:
        bases = {}
        for a in adapters:
            b = a.config.base_model_name_or_path
            if b:
                bases.setdefault(os.path.normpath(b), a.name)
        if len(bases) > 1:
            (b1, n1), (b2, n2) = list(bases.items())[:2]
            raise LoraTuneError(f"adapters {n1} and {n2} were trained on different base models ({b1!r} vs {b2!r}); "
                                "combine adapters of one base (or pass check_base=False / --any-base if these "
                                "name the same model)")
    order: dict[str, Pair] = {}
    for pairs in all_pairs:
        for path, p in pairs.items():
            q = order.setdefault(path, p)
            if (q.kind, q.A.shape[1:], q.B.shape[0]) != (p.kind, p.A.shape[1:], p.B.shape[0]):
                raise LoraTuneError(f"module {path!r} has a different shape in different adapters (A "
                                    f"{tuple(q.A.shape)} vs {tuple(p.A.shape)}); the adapters were made for "
                                    "different base models: combine adapters of one base")
    if not allow_partial:
        for a, pairs in zip(adapters, all_pairs):
            lacking = [p for p in order if p not in pairs]
            if lacking:
                raise LoraTuneError(f"adapter {a.name} does not target {len(lacking)} module(s) the others do "
                                    f"(e.g. {lacking[0]!r}); combine adapters with the same target_modules, or pass "
                                    "allow_partial=True / --allow-partial to count a missing module as ΔW = 0")
    return list(order)


# --- on a live LoraModel ---------------------------------------------------------------------------------------
def adapter_from_model(lora_model, name: str) -> Adapter:
    """Adapter ``name`` of a LoraModel as data (detached copies of its tensors, in the model's module order)."""
    if name not in lora_model.peft_config:
        raise LoraTuneError(f"unknown adapter {name!r}; this model has {list(lora_model.peft_config)}")
    cfg = lora_model.peft_config[name]
    tensors = {k: v.detach().clone() for k, v in state.adapter_tensors(lora_model.model, cfg, name).items()}
    return Adapter(tensors, cfg, name)


def add_to_model(lora_model, adapter: Adapter, name: str) -> None:
    """Inject ``adapter`` into a LoraModel as adapter ``name`` (not made active), its tensors copied in."""
    lora_model.add_adapter(name, adapter.config)
    try:
        ref = next(iter(state.adapter_tensors(lora_model.model, lora_model.peft_config[name], name).values()))
        tensors = {k: v.to(ref.dtype) if isinstance(v, torch.Tensor) else v for k, v in adapter.tensors.items()}
        state.load_adapter_state(lora_model.model, lora_model.peft_config[name], name, tensors, adapter.name)
    except Exception:
        lora_model.delete_adapter(name)
        raise


def add_weighted_adapter(lora_model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total", seed: int | None = None,
                         svd_clamp: float | None = None, allow_partial: bool = False) -> CombineReport:
    """Add adapter ``adapter_name`` to ``lora_model`` (a LoraModel), made from its adapters ``adapters`` by
    ``combine_adapters`` (same modes and arguments), not made active; returns the report (ranks, energy kept).
    Nothing is changed if any check fails."""
    if not isinstance(adapter_name, str) or adapter_name in lora_model.peft_config:
        raise LoraTuneError(f"adapter {adapter_name!r} already exists; pick another name or "
                            f"delete_adapter({adapter_name!r}) first")
    if isinstance(adapters, str):
        raise ConfigError(f"adapters must be a list of adapter names, got the string {adapters!r}; "
                          f"e.g. adapters=[{adapters!r}]")
    parts = [adapter_from_model(lora_model, n) for n in adapters]
    result, report = combine_adapters(parts, weights, combination_type, svd_rank=svd_rank, density=density,
                                      majority_sign_method=majority_sign_method, seed=seed, svd_clamp=svd_clamp,
                                      allow_partial=allow_partial, check_base=False, name=adapter_name)
    add_to_model(lora_model, result, adapter_name)
    return report
