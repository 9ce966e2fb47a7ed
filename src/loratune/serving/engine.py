"""One model step for many sequences: prefill one prompt, or decode one token for every active sequence at once.

The active sequences share one left-padded KV cache (a transformers ``DynamicCache`` of shape (B, heads, L, dim)):
each row's padding is masked out by the attention mask and its positions are given explicitly, so a row computes
what it would alone. A joining sequence is prefilled alone, then its cache is padded and concatenated in; a leaving
one is dropped and the common padding trimmed. Each row names its adapter's slot in the call's ``MixedBatch``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..adapters.batch import mixed_batch
from .registry import AdapterRegistry


@dataclass
class Sampling:
    """Per-request sampling: temperature 0 is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Sampler:
    """Draws the next token of one sequence from its logits (its own generator, so seeds are per request)."""

    def __init__(self, params: Sampling):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(logits.argmax())
        probs = F.softmax(logits.double() / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest set whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs.float(), 1, generator=self.generator))


def _cache_kw(model) -> str:
    """Newer transformers call the cache argument ``cache``; older ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


class Engine:
    """Runs the base model (wrapped by ``registry``) for prefill and batched decode steps."""

    def __init__(self, model, registry: AdapterRegistry, fast: bool = True):
        """``fast=False``: the first design (``MixedBatch`` paths of v1, a fresh batch per step), for comparison."""
        self.model, self.registry, self.fast = model, registry, fast
        self._batch: tuple | None = None
        self.device = next(model.parameters()).device
        self._kw = _cache_kw(model)
        self.cache: DynamicCache | None = None  # the active rows' shared cache
        self.pads: list[int] = []  # left padding of each row
        self.length = 0  # cache length, padding included

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int | None) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """Logits of the last prompt position, and the prompt's per-layer (keys, values)."""
        x = torch.tensor([ids], device=self.device)
        with mixed_batch(self.registry.batch([slot], fast=self.fast)):
            out = self.model(input_ids=x, use_cache=True)
        cache = _out_cache(out)
        return out.logits[0, -1].float(), [(layer.keys, layer.values) for layer in cache.layers]

    @torch.inference_mode()
    def prefill_many(self, prompts: list[list[int]], slots: list[int | None]
                     ) -> list[tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]]:
        """``prefill`` for several prompts in one left-padded forward (padding masked out, positions explicit, so each
        row computes what it would alone); per prompt, its last logits and its own (unpadded) keys and values."""
        if len(prompts) == 1:
            return [self.prefill(prompts[0], slots[0])]
        n, length = len(prompts), max(len(p) for p in prompts)
        pads = [length - len(p) for p in prompts]
        x = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, (p, pad) in enumerate(zip(prompts, pads)):
            x[i, pad:] = torch.tensor(p)
            mask[i, pad:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with mixed_batch(self.registry.batch(slots, fast=self.fast)):
            out = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device), use_cache=True)
        cache = _out_cache(out)
        return [(out.logits[i, -1].float(), [(layer.keys[i:i + 1, :, pad:], layer.values[i:i + 1, :, pad:])
                                             for layer in cache.layers]) for i, pad in enumerate(pads)]

    def join(self, kvs: list[list[tuple[torch.Tensor, ...]]]) -> None:
        """Append prefilled sequences as new rows of the shared cache."""
        lengths = [kv[0][0].shape[-2] for kv in kvs]
        new_len = max([self.length, *lengths])
        old = [(layer.keys, layer.values) for layer in self.cache.layers] if self.cache is not None else None
        layers = []
        for i in range(len(kvs[0])):
            ks = [] if old is None else [_left_pad(old[i][0], new_len)]
            vs = [] if old is None else [_left_pad(old[i][1], new_len)]
            ks += [_left_pad(kv[i][0], new_len) for kv in kvs]
            vs += [_left_pad(kv[i][1], new_len) for kv in kvs]
            layers.append((torch.cat(ks), torch.cat(vs)))
        self.pads = [p + new_len - self.length for p in self.pads] + [new_len - n for n in lengths]
        self.length = new_len
        self.cache = DynamicCache(ddp_cache_data=layers, config=getattr(self.model, "config", None))

    def drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order); trim padding no row needs any more."""
        if not keep:
            self.cache, self.pads, self.length, self._batch = None, [], 0, None
            return
        idx = torch.tensor(keep, device=self.device)
        pads = [self.pads[i] for i in keep]
        trim = min(pads)
        layers = [(layer.keys.index_select(0, idx)[:, :, trim:], layer.values.index_select(0, idx)[:, :, trim:])
                  for layer in self.cache.layers]
        self.pads, self.length = [p - trim for p in pads], self.length - trim
        self.cache = DynamicCache(ddp_cache_data=layers, config=getattr(self.model, "config", None))

    @torch.inference_mode()
    def decode(self, last: list[int], slots: list[int | None]) -> torch.Tensor:
        """One token for every row: ``last`` are their newest tokens; returns (rows, vocab) logits."""
        n = len(last)
        mask = torch.ones(n, self.length + 1, dtype=torch.long, device=self.device)
        for i, p in enumerate(self.pads):
            mask[i, :p] = 0
        pos = torch.tensor([[self.length - p] for p in self.pads], device=self.device)
        x = torch.tensor(last, device=self.device).view(n, 1)
        key = (tuple(slots), self.registry.stats.swaps)  # the same rows in the same slots: reuse the batch
        if self._batch is None or self._batch[0] != key:
            self._batch = (key, self.registry.batch(slots, fast=self.fast))
        with mixed_batch(self._batch[1]):
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True,
                             **{self._kw: self.cache})
        self.cache = _out_cache(out)
        self.length += 1
        return out.logits[:, -1].float()


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t
