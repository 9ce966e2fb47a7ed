"""Mixed-adapter batches: one adapter per row, described per call and never left on the modules.

A ``MixedBatch`` names each row's adapter (a key; None = the base). ``mixed_batch(batch)`` makes it current for the
calls inside a ``with`` block through a context variable, so each thread and asyncio task sees only its own. Its rows
are grouped into per-adapter segments once per call; a LoRA layer then adds, with ``add_mixed_terms``, the LoRA term
of every segment (Punica's segmented shrink/expand), or, given stacked zero-padded factors (the serving registry's
slots), the term of all rows at once with two gathered ``bmm``s. Rows without an adapter are never written to, so
they equal the base exactly (there is no "-1 means none" index to get wrong: such rows are simply not gathered).

This module sits below ``adapters.layers`` (which imports it) and imports nothing from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import NamedTuple

import torch
from torch import nn

from ..errors import LoraTuneError

BASE = "__base__"  # name of "no adapter" in per-row adapter selection, as in PEFT


class Factors(NamedTuple):
    """One adapter's factors for one layer, as a ``MixedBatch`` hands them to the layer (duck-types LoraAdapter)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float = 1.0
    dropout: float = 0.0


class MixedBatch:
    """Per-call metadata of a mixed-adapter batch: which adapter (a key; None = the base) each row uses.

    ``factors(layer, key)`` gives the layer's factors for a key (a ``LoraAdapter`` or ``Factors``; None where that
    adapter does not target the layer). ``stacks(layer)``, optional, gives stacked factors ``(A (S, r, in),
    B (S, out, r))`` indexed by integer keys, zero-padded to a common rank and with the scaling folded into B; with
    them a linear layer computes every row in two gathered ``bmm``s when that is cheaper than a product per segment.
    ``layers`` are the modules the batch applies to (other models' layers ignore it); ``copies(module, key)`` gives
    a ``ModulesToSave`` module's copy for a key (or None).
    """

    def __init__(self, keys: Sequence[Hashable | None], factors: Callable[[nn.Module, Hashable], object | None],
                 layers: Iterable[nn.Module], stacks: Callable[[nn.Module], tuple | None] | None = None,
                 copies: Callable[[nn.Module, Hashable], nn.Module | None] | None = None):
        self.keys = tuple(keys)
        self.factors, self.stacks, self.copies = factors, stacks, copies
        self.layers = frozenset(id(m) for m in layers)
        groups: dict[Hashable, list[int]] = {}
        for i, k in enumerate(self.keys):
            if k is not None:
                groups.setdefault(k, []).append(i)
        self.segments: list[tuple[Hashable, int, int]] = []
        order: list[int] = []
        for k, rows in groups.items():
            self.segments.append((k, len(order), len(order) + len(rows)))
            order += rows
        self._order = torch.tensor(order, dtype=torch.long)
        self._slots = torch.tensor([self.keys[i] for i in order], dtype=torch.long) if stacks is not None else None
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def applies_to(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of the layers this batch was made for."""
        return id(module) in self.layers

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows that have an adapter, grouped by adapter; their slot numbers when stacked) on ``device``."""
        if device not in self._on:
            slots = self._slots.to(device) if self._slots is not None else None
            self._on[device] = (self._order.to(device), slots)
        return self._on[device]

    def prefer_gathered(self, tokens_per_row: int) -> bool:
        """Two gathered bmms beat a product per segment when segments are many and short, or rows are long (the
        gather copies r·(in+out) per row, small next to tokens·r·(in+out) of products)."""
        n = len(self._order)
        return len(self.segments) > 1 and (tokens_per_row >= 8 or 2 * len(self.segments) > n)


_CURRENT: ContextVar[MixedBatch | None] = ContextVar("loratune_mixed_batch", default=None)


@contextlib.contextmanager
def mixed_batch(batch: MixedBatch | None) -> Iterator[MixedBatch | None]:
    """Make ``batch`` the current mixed batch for the calls inside this block (this thread / task only)."""
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)


def current_batch(module: nn.Module) -> MixedBatch | None:
    """The mixed batch of the running call if it applies to ``module``, else None."""
    batch = _CURRENT.get()
    return batch if batch is not None and batch.applies_to(module) else None


def adapter_factors(layer: nn.Module, name: Hashable) -> nn.Module | None:
    """A ``MixedBatch`` factor source over a model's own adapters: the layer's ``LoraAdapter`` ``name``, or None."""
    return layer.adapters[name] if name in getattr(layer, "adapters", {}) else None


def batch_for(module: nn.Module) -> MixedBatch | None:
    """The batch that applies to ``module`` now: the current one, or the deprecated per-module ``row_adapters`` list
    (set by hand, never by LoraModel) read as a one-module MixedBatch; None if neither."""
    batch = current_batch(module)
    if batch is not None:
        return batch
    rows = module.__dict__.get("row_adapters")
    if rows is None:
        return None
    return MixedBatch([None if n == BASE else n for n in rows], adapter_factors, [module],
                      copies=lambda m, k: m.copies[k] if k in m.copies else None)


def add_mixed_terms(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, batch: MixedBatch,
                    lora_term: Callable[[torch.Tensor, object], torch.Tensor], linear: bool) -> torch.Tensor:
    """``result`` (the base layer's output for ``x``) plus each row's own adapter's LoRA term.

    ``lora_term(x_rows, factors)`` is the layer's s·B·A·x; ``linear`` says the layer is a plain linear map, so the
    stacked factors (scaling already in B) may be used with two gathered ``bmm``s. Rows without an adapter, and rows
    whose adapter does not target this layer, are left exactly as the base computed them.
    """
    if x.shape[0] != len(batch.keys):
        raise LoraTuneError(f"the mixed batch names {len(batch.keys)} rows but this call has {x.shape[0]}")
    order, slots = batch.index(result.device)
    if order.numel() == 0:
        return result
    xs = x.index_select(0, order)
    stacks = batch.stacks(layer) if batch.stacks is not None and linear else None
    if stacks is not None and batch.prefer_gathered(xs[0].numel() // x.shape[-1]):
        A, B = stacks  # (S, r, in), (S, out, r): padding is zero, scaling folded into B
        h = xs.reshape(xs.shape[0], -1, xs.shape[-1]).to(A.dtype)
        u = torch.bmm(h, A.index_select(0, slots).transpose(1, 2))  # shrink: (rows, T, r)
        terms = torch.bmm(u, B.index_select(0, slots).transpose(1, 2)).reshape(*xs.shape[:-1], -1)  # expand
        idx = order
    else:
        parts, rows = [], []
        for key, start, stop in batch.segments:
            f = batch.factors(layer, key)
            if f is not None:
                parts.append(lora_term(xs[start:stop], f))
                rows.append((start, stop))
        if not parts:
            return result
        terms = torch.cat(parts) if len(parts) > 1 else parts[0]
        idx = order if len(rows) == len(batch.segments) else torch.cat([order[a:b] for a, b in rows])
    terms = terms.to(result.dtype)
    # Each row appears once in ``idx``, so this is a plain add per row. (index_put_ rather than index_add_: on CPU,
    # index_add_ always forks its thread pool; with 2 threads on a loaded 2-core VM it took ~200 ms even for a 4x4x32
    # tensor, where index_put_ took microseconds.)
    if result.requires_grad:
        return result.index_put((idx,), terms, accumulate=True)
    return result.index_put_((idx,), terms, accumulate=True)
