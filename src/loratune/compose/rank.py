"""Which rank an adapter actually uses, and changing it: per-module spectra of ΔW, energy ranks, effective rank, a
recommended ``r`` / ``rank_pattern``, and ``resize_adapter`` (truncated SVD of ΔW, or exact zero-padding).

Singular values come from the factors without forming ΔW (``factors.low_rank_svd``), in float64: exact, and fast
enough for every module of a 135M model in well under a second.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch

from ..adapters.factors import Adapter, Pair, energy_kept, lora_pairs, low_rank_svd, to_adapter, truncate
from ..adapters.functional import lora_scaling
from ..adapters.targets import layer_index, pattern_value
from ..errors import ConfigError


@dataclass
class ModuleSpectrum:
    """One module's ΔW: its singular values (largest first), the smallest ranks holding 90 % and 99 % of its
    energy (Σσ²), its effective rank exp(H(σ/Σσ)) (Roy & Vetterli 2007), ‖ΔW‖_F and, given the base, ‖ΔW‖/‖W0‖."""

    path: str
    type: str
    layer: int | None
    rank: int
    singular_values: list[float]
    rank_90: int
    rank_99: int
    effective_rank: float
    norm: float
    relative_norm: float | None = None


@dataclass
class Analysis:
    """``analyze_adapter``'s result: the modules, and recommended ranks (see ``recommend``)."""

    modules: list[ModuleSpectrum]
    recommended_r: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)
    saturated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """The smallest k with Σ_{i<k} σᵢ² ≥ fraction·Σ σᵢ² (0 for a zero ΔW)."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int((cum < fraction - 1e-12).sum()) + 1


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of σᵢ/Σσ (1 for a rank-1 ΔW, r for r equal singular values; 0 for a zero ΔW)."""
    s = s.double()
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def spectrum(pair: Pair) -> torch.Tensor:
    """The singular values of the module's ΔW (float64, min(out, in, r) of them), from an r × r matrix."""
    b, a = pair.factors64()
    rb = torch.linalg.qr(b, mode="r").R
    ra = torch.linalg.qr(a.T, mode="r").R
    return torch.linalg.svdvals(rb @ ra.T)


def analyze_adapter(adapter: Adapter, base: dict[str, torch.Tensor] | None = None,
                    fraction: float = 0.9) -> Analysis:
    """Per-module spectra of ``adapter``'s ΔW and ranks recommended from them (``recommend`` with ``fraction``).
    ``base`` (a base model's state dict) adds ‖ΔW‖_F / ‖W0‖_F per module."""
    modules = []
    for path, p in lora_pairs(adapter).items():
        s = spectrum(p)
        norm = float(torch.linalg.vector_norm(s))
        rel = None
        if base is not None:
            w0 = base.get(path + ".weight", base.get(path + ".base_layer.weight"))
            if w0 is None:
                raise ConfigError(f"the base model has no weight for module {path!r}; give the base the adapter "
                                  "was trained on")
            rel = norm / max(float(w0.double().norm()), 1e-30)
        modules.append(ModuleSpectrum(path, path.rsplit(".", 1)[-1], layer_index(path, None), p.rank,
                                      [float(x) for x in s], energy_rank(s, 0.9), energy_rank(s, 0.99),
                                      effective_rank(s), norm, rel))
    return recommend(modules, fraction)


def recommend(modules: list[ModuleSpectrum], fraction: float = 0.9) -> Analysis:
    """Recommended ranks: for a group of modules, the 90th percentile (nearest rank) of the ranks that hold
    ``fraction`` of each module's energy, rounded up to a power of two and capped at the largest trained rank.
    ``recommended_r`` is that over all modules, ``by_type`` per module type (q_proj, ...), and ``rank_pattern``
    the types whose value differs from ``recommended_r`` (paste it into LoraConfig). ``saturated`` lists modules
    whose 99 % rank is their whole rank: they may want more."""
    def need(m: ModuleSpectrum) -> int:
        return m.rank_90 if fraction == 0.9 else energy_rank(torch.tensor(m.singular_values), fraction)

    def pick(group: list[ModuleSpectrum]) -> int:
        needs = sorted(max(1, need(m)) for m in group)
        q = needs[max(0, math.ceil(0.9 * len(needs)) - 1)]
        return min(2 ** math.ceil(math.log2(q)), max(m.rank for m in group))

    if not modules:
        raise ConfigError("the adapter has no LoRA modules to analyze")
    groups: dict[str, list[ModuleSpectrum]] = defaultdict(list)
    for m in modules:
        groups[m.type].append(m)
    overall = pick(modules)
    by_type = {t: pick(g) for t, g in sorted(groups.items())}
    pattern = {t: r for t, r in by_type.items() if r != overall}
    saturated = [m.path for m in modules if m.rank_99 >= m.rank and m.rank > 1]
    return Analysis(modules, overall, pattern, by_type, saturated)


def format_analysis(a: Analysis) -> str:
    """A table, one row per module, then the recommendation."""
    rel = any(m.relative_norm is not None for m in a.modules)
    head = f"{'module':<48} {'r':>4} {'r90':>4} {'r99':>4} {'eff.rank':>8} {'‖ΔW‖':>9}" + \
        (f" {'‖ΔW‖/‖W0‖':>10}" if rel else "")
    lines = [head]
    for m in a.modules:
        line = f"{m.path[-48:]:<48} {m.rank:>4} {m.rank_90:>4} {m.rank_99:>4} {m.effective_rank:>8.2f} {m.norm:>9.3g}"
        lines.append(line + (f" {m.relative_norm:>10.3g}" if rel else ""))
    lines.append(f"recommended r = {a.recommended_r} (90 % of ΔW's energy in 90 % of modules); per type: "
                 + ", ".join(f"{t}={r}" for t, r in a.by_type.items()))
    if a.rank_pattern:
        lines.append(f"as a config: r={a.recommended_r}, rank_pattern={a.rank_pattern}")
    if a.saturated:
        lines.append(f"{len(a.saturated)} module(s) use their whole rank (99 % rank = r), e.g. {a.saturated[0]}: "
                     "a larger r may help there")
    return "\n".join(lines)


def resize_adapter(adapter: Adapter, new_r: int, rank_pattern: dict[str, int] | None = None,
                   seed: int = 0) -> tuple[Adapter, dict[str, float]]:
    """``adapter`` at rank ``new_r`` (per module: ``rank_pattern``'s value where a key matches, as in LoraConfig):
    the best rank-k approximation of each ΔW by SVD, and (energy kept per module). Growing is exact: the extra
    components get B = 0 and random A rows (as LoRA's own init), so ΔW is unchanged and they can still train. The
    result keeps rsLoRA and α/r (α unchanged under rsLoRA); its factors hold each ΔW exactly at that scaling."""
    if isinstance(new_r, bool) or not isinstance(new_r, int) or new_r < 1:
        raise ConfigError(f"the new rank must be a whole number ≥ 1, got {new_r!r}")
    cfg = adapter.config
    pattern = dict(rank_pattern or {})
    alpha = cfg.lora_alpha if cfg.use_rslora else cfg.lora_alpha * new_r / cfg.r
    g = torch.Generator().manual_seed(seed)
    out, kept = {}, {}
    for path, p in lora_pairs(adapter).items():
        k = pattern_value(pattern, path, new_r)
        if k > p.max_rank:
            raise ConfigError(f"rank {k} is more than module {path!r} allows (its ΔW is {p.B.shape[0]}×"
                              f"{p.A[0].numel()}, rank ≤ {p.max_rank}); use a rank ≤ {p.max_rank}")
        b, a = p.factors64()
        u, s, vh = low_rank_svd(b, a)
        nb, na = truncate(u, s, vh, k)
        n = s.shape[0]
        if k > n:  # truncate padded with zeros; the padded rows of A get LoRA's init so they can train
            bound = 1 / math.sqrt(na.shape[1])
            na[n:] = (torch.rand(k - n, na.shape[1], generator=g, dtype=torch.float64) * 2 - 1) * bound
        scale = lora_scaling(alpha, k, cfg.use_rslora)
        out[path] = p.from_factors(nb, na, scaling=scale)
        kept[path] = energy_kept(s, k)
    dtype = next(iter(adapter.tensors.values())).dtype
    result = to_adapter(out, cfg, adapter.name + f"-r{new_r}", dtype=dtype, use_rslora=cfg.use_rslora)
    return result, kept
