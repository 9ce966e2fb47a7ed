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
import threading
from collections import Counter
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
                 copies: Callable[[nn.Module, Hashable], nn.Module | None] | None = None, fast: bool = True,
                 cache_bytes: int = 0):
        self.keys = tuple(keys)
        self.fast, self.cache_bytes = fast, cache_bytes
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: dict[int, list] = {}
        self.paths: Counter[str] = Counter()  # layer calls per path taken: single, onehot, gathered, general
        self._cached = 0
        self._mask: dict[tuple, torch.Tensor] = {}
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
        self.distinct = [k for k, _, _ in self.segments]
        self.all_adapted = len(order) == len(self.keys)

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


    def slot_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(rows, distinct adapters, 1): 1 where a row uses that adapter (segments' order), 0 elsewhere (base rows:
        all 0)."""
        key = (device, dtype)
        if key not in self._mask:
            mask = torch.zeros(len(self.keys), len(self.distinct), 1, dtype=dtype)
            for j, (_, start, stop) in enumerate(self.segments):
                mask[self._order[start:stop], j] = 1
            self._mask[key] = mask.to(device)
        return self._mask[key]

    def groups(self, size: int) -> list[tuple[tuple, int, int, torch.Tensor]]:
        """The segments in groups of at most ``size`` adapters: (their keys, first and last+1 position in the grouped
        row order, a (rows, keys, 1) 0/1 mask of which key each of those rows uses)."""
        if size not in self._groups:
            out = []
            for g in range(0, len(self.segments), size):
                segs = self.segments[g:g + size]
                start, stop = segs[0][1], segs[-1][2]
                mask = torch.zeros(stop - start, len(segs), 1)
                for j, (_, a, b) in enumerate(segs):
                    mask[a - start:b - start, j] = 1
                out.append((tuple(k for k, _, _ in segs), start, stop, mask))
            self._groups[size] = out
        return self._groups[size]

    def concatenated(self, layer: nn.Module, A: torch.Tensor, B: torch.Tensor, keys: Sequence | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of ``layer`` for ``keys`` (default: this batch's distinct adapters) side by side: (n·r, in)
        and (n·r, out); kept for the batch's later calls (the engine reuses a batch over decode steps while its rows
        keep their slots) while the total stays under ``cache_bytes``."""
        keys = tuple(self.distinct if keys is None else keys)
        hit = self._cache.get((id(layer), keys))
        if hit is not None:
            return hit
        idx = torch.tensor(keys, dtype=torch.long, device=A.device)
        Ac = A.index_select(0, idx).reshape(-1, A.shape[-1])
        Bc = B.index_select(0, idx).transpose(1, 2).reshape(-1, B.shape[1])
        size = (Ac.numel() + Bc.numel()) * Ac.element_size()
        if self._cached + size <= self.cache_bytes:
            self._cache[id(layer), keys] = (Ac, Bc)
            self._cached += size
        return Ac, Bc


ONEHOT_MAX = 8  # distinct adapters up to which a decode step multiplies every row by all of them (see below)


_CURRENT: ContextVar[MixedBatch | None] = ContextVar("loratune_mixed_batch", default=None)
# How many mixed_batch blocks are open in the process, in any thread. While none is, current_batch answers from this
# plain integer without reading the context variable: torch.compile breaks its graph on ContextVar.get, and a
# compiled training step (train.compile) never runs inside a mixed batch. Changed under a lock (+= on a global is
# not atomic across threads).
_OPEN = 0
_OPEN_LOCK = threading.Lock()


@contextlib.contextmanager
def mixed_batch(batch: MixedBatch | None) -> Iterator[MixedBatch | None]:
    """Make ``batch`` the current mixed batch for the calls inside this block (this thread / task only)."""
    global _OPEN
    with _OPEN_LOCK:
        _OPEN += 1
    token = _CURRENT.set(batch)
    try:
        yield batch
    finally:
        _CURRENT.reset(token)
        with _OPEN_LOCK:
            _OPEN -= 1


def current_batch(module: nn.Module) -> MixedBatch | None:
    """The mixed batch of the running call if it applies to ``module``, else None."""
    if not _OPEN:
        return None
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
    if batch.fast:
        done = _fast_terms(layer, x, result, batch, lora_term, linear)
        if done is not None:
            return done
    batch.paths["general"] += 1
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


def _fast_terms(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, batch: MixedBatch,
                lora_term: Callable[[torch.Tensor, object], torch.Tensor], linear: bool) -> torch.Tensor | None:
    """The faster paths (``MixedBatch.fast``); None where the general path of ``add_mixed_terms`` should run.

    * One adapter on every row: that adapter's term added to all rows, no gather and no scatter (the fused
      single-adapter product, ``x·Aᵀ`` then ``addmm`` into the base output).
    * Decode shapes (≤ 4 tokens per row) over stacked factors: with at most ``ONEHOT_MAX`` distinct adapters, one
      shrink of every row by all of them side by side (``x·[A₁;…;Aₙ]ᵀ``, n·r columns), a 0/1 mask keeping each row's
      own r columns (base rows: none), and one expand ``addmm`` into the base output: two products per layer instead
      of a gather, two bmms and a scatter, at n times the adapter FLOPs (small next to the base at r ≪ hidden). With
      more adapters, the same per group of ``ONEHOT_MAX`` adapters over the rows grouped by adapter, then one
      scatter back (fewer ops than a product pair per segment, with no per-row gather of the factors), unless the
      segments average under two rows: then the general path's gathered bmms.
    """
    inplace = not (result.requires_grad or x.requires_grad)
    if len(batch.distinct) == 1 and batch.all_adapted:
        batch.paths["single"] += 1
        f = batch.factors(layer, batch.distinct[0])
        if f is None:
            return result
        if linear and isinstance(f, Factors) and inplace and x.dtype == f.lora_A.dtype == result.dtype \
                and result.is_contiguous():
            out2 = result.view(-1, result.shape[-1])
            return out2.addmm_(x.reshape(-1, x.shape[-1]) @ f.lora_A.t(), f.lora_B.t()).view_as(result)
        terms = lora_term(x, f).to(result.dtype)
        return result.add_(terms) if inplace else result + terms
    stacks = batch.stacks(layer) if batch.stacks is not None and linear else None
    if stacks is None or not inplace or not result.is_contiguous():
        return None
    A, B = stacks
    tokens = x[0].numel() // x.shape[-1]
    if tokens > 4 or x.dtype != A.dtype or result.dtype != A.dtype:
        return None
    n = x.shape[0]
    if len(batch.distinct) <= ONEHOT_MAX:
        batch.paths["onehot"] += 1
        Ac, Bc = batch.concatenated(layer, A, B)
        r = A.shape[1]
        u = (x.reshape(n, tokens, -1) @ Ac.t()).view(n, tokens, len(batch.distinct), r)
        u = u * batch.slot_mask(x.device, x.dtype).unsqueeze(1)
        out2 = result.view(n * tokens, -1)
        return out2.addmm_(u.view(n * tokens, -1), Bc).view_as(result)
    if batch.prefer_gathered(tokens):
        # More adapters than ONEHOT_MAX in segments of under two rows on average (in serving: each request its own
        # adapter): the general path's two gathered bmms read each row's own factors once, where the grouped one-hot
        # multiplies every row by its group's 8 adapters. Measured (benchmarks/serving.py, forward, fp32, one
        # thread): grouped/gathered 1.19x at 32 rows x 32 adapters, 1.05x at 16 x 16; 0.96x at 64 x 32 (2 rows each).
        return None
    # More adapters: the adapted rows grouped by adapter, and the one-hot product per group of ONEHOT_MAX adapters
    # (the same FLOPs per row as above), then one scatter back into the rows.
    batch.paths["grouped"] += 1
    order, _ = batch.index(x.device)
    xs = x.index_select(0, order).reshape(-1, x.shape[-1])
    terms = torch.empty(xs.shape[0], result.shape[-1], dtype=result.dtype, device=result.device)
    r = A.shape[1]
    for keys, start, stop, mask in batch.groups(ONEHOT_MAX):
        Ac, Bc = batch.concatenated(layer, A, B, keys)
        a, b = start * tokens, stop * tokens
        u = (xs[a:b] @ Ac.t()).view(stop - start, tokens, len(keys), r) * mask.to(x.device, x.dtype).unsqueeze(1)
        torch.mm(u.view(b - a, -1), Bc, out=terms[a:b])
    return result.index_put_((order,), terms.view(len(order), *result.shape[1:]), accumulate=True)
