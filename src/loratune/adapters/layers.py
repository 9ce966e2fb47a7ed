"""LoRA layers: h = W0·x + s·B·A·dropout(x) around a frozen base layer.

One ``LoraLayer`` wraps one base module and holds any number of named adapters. Subclasses say, for their
kind of base module, what shapes A and B have, how the LoRA term is computed and what ΔW is; merging,
switching, disabling and per-row adapter selection live once, in the base class. ``LAYER_TYPES`` maps a
base module type to its LoRA class (a type-keyed registry, as in minLoRA).

Mixed-adapter batches (one adapter per row) are described per call (``adapters.batch``: a ``MixedBatch`` made
current by ``mixed_batch(...)``); a layer that finds one adds each row's own adapter's term, and nothing is left on
the modules.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import ops
from ..errors import LoraTuneError
from ..quant import NF4Linear
from . import functional as LF
from .batch import BASE, MixedBatch, add_mixed_terms, batch_for, current_batch

__all__ = ["BASE", "LAYER_TYPES", "Conv1DLora", "ConvLora", "EmbeddingLora", "LinearLora", "LoraAdapter", "LoraLayer",
           "ModulesToSave", "lora_class_for"]

_HALF = (torch.float16, torch.bfloat16)


def _added(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """weight + delta rounded once to the weight's dtype: a half weight is added to in fp32 (an fp32 adapter's ΔW
    rounded to bf16 first, then added in bf16, would round twice)."""
    if weight.dtype in _HALF:
        return (weight.float() + delta.float()).to(weight.dtype)
    return weight + delta.to(weight.dtype)


class LoraAdapter(nn.Module):
    """One adapter's trainable factors for one layer. Shapes are the kind's (see ``adapter_shapes``)."""

    def __init__(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r: int, lora_alpha: float,
                 dropout: float, use_rslora: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(b_shape, dtype=dtype, device=device))
        self.r, self.lora_alpha, self.dropout = r, lora_alpha, dropout
        self.scaling = LF.lora_scaling(lora_alpha, r, use_rslora)
        self.variant = None  # a variant with its own forward and merge (adapters.variants), or None: plain LoRA

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


class LoraLayer(nn.Module):
    """Base class: a frozen ``base_layer`` plus named adapters, with idempotent merge/unmerge."""

    # Names of A and B in PEFT's adapter files, after the module path.
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: list[str] | None = None  # deprecated: per-row names for this layer alone (see MixedBatch)

    # --- what each kind defines ----------------------------------------------------------------------
    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def lora_term(self, x: torch.Tensor, ad: LoraAdapter) -> torch.Tensor:
        """s·B·A·dropout(x), shaped like the base layer's output."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW for adapter ``name``, shaped like the base weight."""
        raise NotImplementedError

    def reset_adapter(self, ad: LoraAdapter, init: bool | str) -> None:
        """PEFT's init: A Kaiming-uniform(a=√5) or Gaussian(1/r), B zero, so the output starts at the base's."""
        if init == "gaussian":
            nn.init.normal_(ad.lora_A, std=1 / ad.r)
        else:
            nn.init.kaiming_uniform_(ad.lora_A, a=math.sqrt(5))
        if init is False:  # both random: a non-trivial adapter for tests
            nn.init.kaiming_uniform_(ad.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(ad.lora_B)

    # --- adapters ------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, lora_alpha: float, dropout: float, use_rslora: bool,
                    init: bool | str, variant=None) -> None:
        w = self.weight
        # fp16/bf16 bases get fp32 adapters, as PEFT does: tiny updates vanish in half precision.
        dtype = torch.float32 if w.dtype in _HALF or not w.is_floating_point() \
            else w.dtype
        ad = LoraAdapter(*self.adapter_shapes(r), r, lora_alpha, dropout, use_rslora, dtype, w.device)
        self.reset_adapter(ad, init)
        self.adapters[name] = ad
        if variant is not None:  # ``variants.Variant``: its init (PiSSA, DoRA's magnitude, ...), then maybe its forward
            variant.init(self, name)
            ad.variant = variant if variant.custom_forward else None
        if not self.active:
            self.active = [name]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    # --- merge ---------------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None, safe_merge: bool = False, force: bool = False) -> None:
        """W0 += ΔW for each named (default: active) adapter not merged yet; merging twice warns. A base layer that
        stores W0 its own way adds ΔW itself (``add_to_weight``: a 4-bit ``quant.NF4Linear`` refuses unless
        ``force``)."""
        for name in names if names is not None else self.active:
            if name in self.merged:
                warnings.warn(f"adapter '{name}' is already merged; nothing changed", stacklevel=3)
                continue
            v = self.adapters[name].variant
            delta = v.merge_delta(self, name) if v else self.delta_weight(name)
            if hasattr(self.base_layer, "add_to_weight"):
                self.base_layer.add_to_weight(delta.to(self.weight.dtype), safe=safe_merge, force=force)
                self.merged.append(name)
                continue
            merged = _added(self.weight.data, delta)
            if safe_merge and not torch.isfinite(merged).all():
                raise LoraTuneError(f"merging adapter '{name}' gives non-finite weights; "
                                    "the adapter is broken (retrain it, or check its file)")
            self.weight.data.copy_(merged)
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """W0 -= ΔW for merged adapters (default: all), newest first."""
        for name in reversed(list(self.merged if names is None else names)):
            if name in self.merged:
                v = self.adapters[name].variant
                delta = v.unmerge_delta(self, name) if v else self.delta_weight(name)
                if hasattr(self.base_layer, "add_to_weight"):  # (it was merged with force)
                    self.base_layer.add_to_weight(-delta.to(self.weight.dtype), force=True)
                else:
                    self.weight.data.copy_(_added(self.weight.data, -delta))
                self.merged.remove(name)

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        batch = batch_for(self)
        if batch is not None:
            return self._mixed_forward(x, result, batch)
        for name in self.active:
            if name not in self.merged:
                v = self.adapters[name].variant
                result = v.forward(self, name, x, result) if v else \
                    result + self.lora_term(x, self.adapters[name]).to(result.dtype)
        return result

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor, batch: MixedBatch) -> torch.Tensor:
        """Each row gets its own adapter's term (``batch.add_mixed_terms``); rows without one are left as they are."""
        if self.merged:
            raise LoraTuneError("per-row adapter_names need unmerged adapters; call unmerge_adapter() first")
        return add_mixed_terms(self, x, result, batch, self.lora_term, linear=isinstance(self, LinearLora))


class LinearLora(LoraLayer):
    """LoRA for ``nn.Linear``: A (r, in), B (out, r)."""

    fan_in_fan_out = False

    def adapter_shapes(self, r):
        out_f, in_f = self.weight.shape
        return (r, in_f), (out_f, r)

    def lora_term(self, x, ad):
        if getattr(ad, "variant", None) is not None and current_batch(self) is not None:
            raise LoraTuneError(f"mixed-adapter batches do not support {ad.variant.name} adapters yet; run their rows "
                                "in a call of their own (set_adapter)")
        return LF.lora_linear_reference(x.to(ad.lora_A.dtype), ad.lora_A, ad.lora_B, ad.scaling,
                                        ad.dropout, self.training)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._unfused_reason(x, args, kwargs) is not None:
            ad = self.adapters[self.active[0]] if len(self.active) == 1 else None
            if ad is not None and ad.variant is not None and self._variant_runs(args, kwargs):
                return ad.variant.forward(self, self.active[0], x, None)  # the sole adapter's variant: all of it
            return super().forward(x, *args, **kwargs)
        ad = self.adapters[self.active[0]]
        if hasattr(self.base_layer, "dense_weight"):  # a base that stores W0 another way (4 bits) lends it dense
            with self.base_layer.dense_weight() as w:
                return ops.lora_linear(x, w, self.base_layer.bias, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout,
                                       self.training, consumer=self)
        w = self.weight.t() if self.fan_in_fan_out else self.weight  # (out, in) either way; a view, no copy
        return ops.lora_linear(x, w, self.base_layer.bias, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout,
                               self.training, consumer=self)

    def _unfused_reason(self, x: torch.Tensor, args: tuple = (), kwargs: dict | None = None) -> str | None:
        """Why this call takes the general path (None: the fused ``ops.lora_linear`` runs it).

        The fused path covers the common case: one active unmerged adapter, a plain Linear/Conv1D base (or one that
        lends a dense weight for the product, ``dense_weight()``: ``quant.NF4Linear``), and what
        ``ops.unfused_reason`` asks of the tensors (a frozen weight, matching dtypes, no autocast). Mixed batches,
        several adapters, merged or disabled adapters and other subclassed bases take the general path.
        """
        if args or kwargs:
            return "the base layer is called with extra arguments"
        if self.disabled:
            return "adapters are disabled"
        if current_batch(self) is not None or self.row_adapters is not None:
            return "a mixed-adapter batch"
        if len(self.active) != 1 or self.merged:
            return f"{len(self.active)} active adapters" if len(self.active) != 1 else "the adapter is merged"
        if type(self.base_layer) not in (nn.Linear, Conv1D) and not hasattr(self.base_layer, "dense_weight"):
            return f"the base layer is a {type(self.base_layer).__name__}, not a plain Linear/Conv1D"
        ad = self.adapters[self.active[0]]
        if ad.variant is not None:
            return f"a {ad.variant.name} adapter: its variant computes the layer (adapters.variants)"
        return ops.unfused_reason(x, self.weight, ad.lora_A, ad.lora_B, ad.dropout)

    def _variant_runs(self, args: tuple, kwargs: dict) -> bool:
        """Whether the sole active adapter's variant computes this call whole (else: on top of the base's output)."""
        return not (args or kwargs or self.disabled or self.merged or current_batch(self) is not None
                    or self.row_adapters is not None)

    def plan(self, x: torch.Tensor) -> ops.Plan:
        """Which path ``forward(x)`` takes now, and why: ``plan(x).path`` is "fused" or "reference"."""
        reason = self._unfused_reason(x)
        if reason is not None:
            return ops.Plan("reference", reason)
        ad = self.adapters[self.active[0]]
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return ops.plan(x, w, ad.lora_A, ad.lora_B, ad.dropout, self.training)

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.linear_delta_weight(ad.lora_A, ad.lora_B, ad.scaling, self.fan_in_fan_out)


class Conv1DLora(LinearLora):
    """LoRA for GPT-2's ``Conv1D``, whose weight is stored (in, out): ΔW is transposed (fan_in_fan_out)."""

    fan_in_fan_out = True

    def adapter_shapes(self, r):
        in_f, out_f = self.weight.shape
        return (r, in_f), (out_f, r)


class EmbeddingLora(LoraLayer):
    """LoRA for ``nn.Embedding``: A (r, num_embeddings) is looked up like the table, B (dim, r). No dropout."""

    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    def adapter_shapes(self, r):
        num, dim = self.weight.shape
        return (r, num), (dim, r)

    def reset_adapter(self, ad, init):
        # PEFT's embedding init: A zero, B normal (A is a lookup table, so it is A that starts at zero).
        nn.init.zeros_(ad.lora_A) if init is not False else nn.init.normal_(ad.lora_A)
        nn.init.normal_(ad.lora_B)

    def lora_term(self, x, ad):
        e = self.base_layer
        after_a = F.embedding(x, ad.lora_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq,
                              e.sparse)  # (..., r)
        return (after_a @ ad.lora_B.T) * ad.scaling

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.embedding_delta_weight(ad.lora_A, ad.lora_B, ad.scaling)


class ConvLora(LoraLayer):
    """LoRA for ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel (r, in, *k), B a 1×…×1 conv (out, r, 1…)."""

    def adapter_shapes(self, r):
        c = self.base_layer
        if c.groups != 1:
            raise LoraTuneError(f"LoRA on grouped convolutions (groups={c.groups}) is not supported; "
                                "leave this module out of target_modules")
        return (r, c.in_channels, *c.kernel_size), (c.out_channels, r, *([1] * len(c.kernel_size)))

    def lora_term(self, x, ad):
        c = self.base_layer
        conv = (F.conv1d, F.conv2d, F.conv3d)[ad.lora_A.dim() - 3]
        x = F.dropout(x.to(ad.lora_A.dtype), ad.dropout, self.training)
        h = c._conv_forward(x, ad.lora_A, None)  # the base's stride, padding (any mode) and dilation
        return conv(h, ad.lora_B) * ad.scaling

    def delta_weight(self, name):
        ad = self.adapters[name]
        return LF.conv_delta_weight(ad.lora_A, ad.lora_B, ad.scaling)


LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LinearLora,
    NF4Linear: LinearLora,  # a 4-bit base (loratune.quant): fused on its dense_weight(), as a Linear
    Conv1D: Conv1DLora,
    nn.Embedding: EmbeddingLora,
    nn.Conv1d: ConvLora,
    nn.Conv2d: ConvLora,
    nn.Conv3d: ConvLora,
}


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class for ``module``'s type (exact type first, then subclasses), or None."""
    cls = LAYER_TYPES.get(type(module))
    if cls is None:
        cls = next((c for t, c in LAYER_TYPES.items() if isinstance(module, t)), None)
    return cls


class ModulesToSave(nn.Module):
    """A module trained in full (e.g. a classifier head): the frozen original plus a copy per adapter."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.row_adapters: list[str] | None = None  # deprecated, as LoraLayer.row_adapters

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)
        self.active = self.active or name

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled or self.active is None:
            return self.original_module(x, *args, **kwargs)
        batch = batch_for(self)
        if batch is None:
            return self.copies[self.active](x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        order, _ = batch.index(x.device)
        for key, start, stop in batch.segments:
            copy_ = batch.copies(self, key) if batch.copies is not None else None
            if copy_ is not None:
                idx = order[start:stop]
                out = out.index_copy(0, idx, copy_(x.index_select(0, idx), *args, **kwargs))
        return out
