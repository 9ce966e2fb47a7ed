"""An adapter as data, and its LoRA pairs as per-module factors: the representation that weighted combination
(``adapters.weighted``) and every compose tool work on.

``Adapter`` is what an adapter directory holds (PEFT-key tensors + ``LoraConfig``). ``lora_pairs`` turns it into
one ``Pair`` per module: A and B as stored, the module's own scaling (``alpha_pattern``, ``rank_pattern`` and rsLoRA
each applied as the adapter's config says) and the "matrix" view ΔW = s·B·A of shape (out, in·k), the layout in
which ranks and singular values are defined. ``weight_layout``/``matrix_layout`` convert to and from the layout of
the base weight (transposed for embeddings and GPT-2's Conv1D, the kernel's shape for convolutions). ``from_factors``
and ``low_rank_svd`` go back from a ΔW to factors.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import AdapterFileError, ConfigError, ConfigWarning
from . import functional as LF
from .config import LoraConfig
from .state import PREFIX
from .targets import pattern_value

_KEYS = {"linear": (".lora_A.weight", ".lora_B.weight"), "embedding": (".lora_embedding_A", ".lora_embedding_B")}


@dataclass
class Adapter:
    """One LoRA adapter as data: its tensors under PEFT's keys and its config; ``name`` appears in messages."""

    tensors: dict[str, torch.Tensor]
    config: LoraConfig
    name: str = "adapter"


@dataclass
class Pair:
    """One module's LoRA factors: A (r, in[, *k]) and B (out, r[, 1...]) as stored, with the module's scaling."""

    path: str
    kind: str  # "linear" (Linear/Conv1D), "embedding" or "conv"
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def max_rank(self) -> int:
        """The largest rank a ΔW of this module can have: min(out, in·k)."""
        return min(self.B.shape[0], self.A[0].numel())

    def factors64(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float64 as (out, r) and (r, in·k) matrices, the scaling folded into B: ΔW = B @ A."""
        return self.B.flatten(1).double() * self.scaling, self.A.flatten(1).double()

    def matrix(self) -> torch.Tensor:
        """ΔW = s·B·A in float64, shape (out, in·k)."""
        b, a = self.factors64()
        return b @ a

    def weight_layout(self, m: torch.Tensor) -> torch.Tensor:
        """A (out, in·k) matrix in the base weight's layout (what PEFT's ``get_delta_weight`` returns)."""
        if self.kind == "conv":
            return m.reshape(self.B.shape[0], *self.A.shape[1:])
        if self.kind == "embedding" or self.fan_in_fan_out:
            return m.T
        return m

    def matrix_layout(self, w: torch.Tensor) -> torch.Tensor:
        """The inverse of ``weight_layout``."""
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1)
        if self.kind == "embedding" or self.fan_in_fan_out:
            return w.T
        return w

    def from_factors(self, b: torch.Tensor, a: torch.Tensor, scaling: float = 1.0) -> Pair:
        """A Pair of this module from (out, R) and (R, in·k) matrices with ΔW = b @ a, stored for ``scaling``."""
        rank = a.shape[0]
        A = a.reshape(rank, *self.A.shape[1:])
        B = (b / scaling).reshape(self.B.shape[0], rank, *self.B.shape[2:])
        return dataclasses.replace(self, A=A, B=B, scaling=scaling)


def lora_pairs(adapter: Adapter, allow_other: bool = True) -> dict[str, Pair]:
    """Module path -> its ``Pair``, in the order the tensors come. Tensors that are not LoRA factors
    (modules_to_save, trained biases) are an error unless ``allow_other``."""
    cfg, t = adapter.config, adapter.tensors
    if getattr(cfg, "use_dora", False):  # its ΔW is not s·B·A: the magnitude vector rescales every column
        raise ConfigError(f"adapter {adapter.name} is a DoRA adapter (use_dora=True); combining, analyzing and "
                          "resizing DoRA adapters is not supported yet (only the plain LoRA ΔW = s·B·A is): use "
                          "plain LoRA adapters")
    if getattr(cfg, "use_adalora", False):  # ΔW = s·B·(A⊙E)/ranknum, not the s·B·A these tools read
        raise ConfigError(f"adapter {adapter.name} is an AdaLoRA adapter (peft_type ADALORA); combining, analyzing "
                          "and resizing AdaLoRA adapters is not supported (only the plain LoRA ΔW = s·B·A is): merge "
                          "it (loratune merge) or use plain LoRA adapters")
    pairs: dict[str, Pair] = {}
    for key in t:
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"adapter {adapter.name}: key {key!r} does not start with {PREFIX!r}; is it a "
                                   "PEFT LoRA adapter?")
        kind = next((k for k, (a, _) in _KEYS.items() if key.endswith(a)), None)
        if kind is None:
            if key.endswith(".base_layer.weight") and PREFIX + key[len(PREFIX):-18] + ".lora_embedding_A" in t:
                warnings.warn(f"adapter {adapter.name}: the embedding table PEFT saved beside the LoRA of "
                              f"{key[len(PREFIX):-18]!r} is the base model's and is not carried over", ConfigWarning,
                              stacklevel=2)
                continue
            if not allow_other and not key.endswith(tuple(b for _, b in _KEYS.values())):
                raise AdapterFileError(
                    f"adapter {adapter.name} trains full tensors besides its LoRA factors (e.g. {key!r}, from "
                    "modules_to_save or bias); these cannot be combined or re-ranked by weight: use adapters "
                    "trained with bias='none' and no modules_to_save")
            continue
        key_a, key_b = _KEYS[kind]
        path = key[len(PREFIX):-len(key_a)]
        b = t.get(PREFIX + path + key_b)
        a = t[key]
        if b is None:
            raise AdapterFileError(f"adapter {adapter.name}: module {path!r} has {key_a[1:]} but no {key_b[1:]}; "
                                   "the file is incomplete (re-save the adapter)")
        if a.dim() > 2:
            kind = "conv"
        if b.shape[1] != a.shape[0] or not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterFileError(f"adapter {adapter.name}: module {path!r} has A {tuple(a.shape)} and B "
                                   f"{tuple(b.shape)}, which are not LoRA factors of one rank; re-save the adapter")
        alpha = pattern_value(cfg.alpha_pattern, path, cfg.lora_alpha)
        pairs[path] = Pair(path, kind, a, b, LF.lora_scaling(alpha, a.shape[0], cfg.use_rslora),
                           fan_in_fan_out=cfg.fan_in_fan_out and kind == "linear")
    for key in t:  # a B with no A
        kind = next((k for k, (_, b) in _KEYS.items() if key.endswith(b)), None)
        if kind is not None and key[len(PREFIX):-len(_KEYS[kind][1])] not in pairs:
            raise AdapterFileError(f"adapter {adapter.name}: {key!r} has no matching A factor; re-save the adapter")
    if not pairs:
        raise AdapterFileError(f"adapter {adapter.name} holds no LoRA factors; is it a LoRA adapter?")
    return pairs


def low_rank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of ΔW = b @ a (b: (m, k), a: (k, n)) without forming ΔW: QR of both factors, then the SVD of a
    small matrix. Exact (the same singular triplets as ``torch.linalg.svd(b @ a)``), min(m, n, k) of them."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors (B, A) = (U·S, Vh) as PEFT builds them, zero-padded where the SVD has fewer
    than ``rank`` triplets (ΔW unchanged)."""
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if a.shape[0] < rank:
        pad = rank - a.shape[0]
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], 0)
    return b, a


def energy_kept(s: torch.Tensor, rank: int) -> float:
    """Σ_{i<rank} σᵢ² / Σ σᵢ² (1.0 for a zero ΔW)."""
    total = float((s.double() ** 2).sum())
    return 1.0 if total == 0 else float((s[:rank].double() ** 2).sum()) / total


def to_adapter(pairs: dict[str, Pair], template: LoraConfig, name: str = "adapter",
               dtype: torch.dtype | None = None, **changes) -> Adapter:
    """An ``Adapter`` holding ``pairs``, whose config is ``template`` with exactly these modules targeted (full
    paths, no layer filters) and each module's rank and scaling as its Pair has them: r is the most common rank,
    the others go in ``rank_pattern``; lora_alpha and ``alpha_pattern`` give each module its Pair's scaling.
    ``changes`` override further config fields (e.g. ``use_rslora``)."""
    ranks = Counter(p.rank for p in pairs.values())
    r = ranks.most_common(1)[0][0]
    use_rslora = changes.pop("use_rslora", False)

    def alpha(p: Pair) -> float:  # s = α/r (or α/√r): the α that gives this Pair's scaling at its rank
        return float(f"{p.scaling * (p.rank ** 0.5 if use_rslora else p.rank):.12g}")

    alphas = Counter(alpha(p) for p in pairs.values() if p.rank == r)
    lora_alpha = alphas.most_common(1)[0][0]
    rank_pattern = {re.escape(p.path): p.rank for p in pairs.values() if p.rank != r}
    alpha_pattern = {re.escape(p.path): alpha(p) for p in pairs.values() if alpha(p) != lora_alpha}
    config = dataclasses.replace(
        template, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, target_modules=list(pairs), exclude_modules=None, layers_to_transform=None,
        layers_pattern=None, modules_to_save=None, bias="none", init_lora_weights=True, **changes)
    tensors: dict[str, torch.Tensor] = {}
    for p in pairs.values():
        key_a, key_b = _KEYS["embedding" if p.kind == "embedding" else "linear"]
        tensors[PREFIX + p.path + key_a] = p.A.to(dtype or p.A.dtype).contiguous()
        tensors[PREFIX + p.path + key_b] = p.B.to(dtype or p.B.dtype).contiguous()
    return Adapter(tensors, config, name)


def delta_weights(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Module path -> ΔW in the base weight's layout, float64: what merging this adapter adds to each weight."""
    return {path: p.weight_layout(p.matrix()) for path, p in lora_pairs(adapter).items()}
