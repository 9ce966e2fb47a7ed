"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), for Linear and GPT-2's Conv1D.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row,    the norm detached from the graph (the paper's §4.3)

m (one per output) trains with A and B and starts at the row norms of W0 + s·B·A (of W0, with B = 0). The layer's
output is therefore g ⊙ (W0·x + s·B·A·x) + b with g = m / ‖·‖, which is how it is computed: the LoRA product of the
plain fused path (``ops.lora_linear``, or autograd over the plain ops where that path does not apply), then one
per-channel scale, never W0 + s·B·A itself. The norm comes from W0 and the factors alone:

    ‖w_i + s·(BA)_i‖² = ‖w_i‖² + 2s·Σ_k B_ik (W0·Aᵀ)_ik + s²·Σ_kl B_ik (A·Aᵀ)_kl B_il

(‖w_i‖² cached while W0 is unchanged; W0·Aᵀ is out × r, A·Aᵀ r × r), so a step costs one W0·Aᵀ per layer beyond
LoRA's products and one elementwise pass. With dropout, the dropped input goes to the low-rank branch only, as in
plain LoRA (PEFT and the paper's code also feed it to a second W0 product for the (g − 1)·W0 part of the update);
without dropout, and in eval mode, the two are the same function. PEFT's files store m as ``lora_magnitude_vector``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ... import ops
from .. import functional as LF
from .base import Initializer, Variant


def row_norms(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
              weight_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W0 + s·B·A‖ per output row (weight (out, in), A (r, in), B (out, r)) without forming the out × in sum;
    ``weight_sq``: ‖W0‖² per row if known. In A's dtype (fp32 for a half-precision base), without a gradient."""
    with torch.no_grad():
        w = weight.to(A.dtype)
        sq = (w * w).sum(1) if weight_sq is None else weight_sq
        cross = (B * F.linear(w, A)).sum(1)  # Σ_k B_ik (W0·Aᵀ)_ik
        quad = ((B @ (A @ A.t())) * B).sum(1)
        return (sq + (2 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0).sqrt()


def dense_row_norms(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The same norm from the formed matrix W0 + s·B·A (for merging, which forms it anyway, and for tests)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.to(A.dtype) + scaling * (B @ A), dim=1)


class Dora(Variant):
    """DoRA on a Linear or Conv1D layer (see the module doc); ``initializer`` (PiSSA, OLoRA, LoftQ) runs first, so m
    starts at the row norms of the initialized W0 + s·B·A, as in PEFT."""

    name = "dora"
    custom_forward = True

    def __init__(self, initializer: Initializer | None = None):
        super().__init__(initializer)

    def check(self, path: str, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Linear, Conv1D)) or hasattr(module, "dense_weight"):
            kind = "a 4-bit NF4Linear" if hasattr(module, "dense_weight") else f"a {type(module).__name__}"
            return (f"use_dora supports Linear and Conv1D layers only, but '{path}' is {kind}; leave it out of "
                    "target_modules (or exclude_modules it), or set use_dora: false")
        return super().check(path, module)

    def init(self, layer: nn.Module, name: str) -> None:
        super().init(layer, name)
        ad = layer.adapters[name]
        m = row_norms(_weight(layer), ad.lora_A, ad.lora_B, ad.scaling)
        ad.lora_magnitude_vector = nn.Parameter(m.to(ad.lora_A.dtype))

    def scale(self, layer: nn.Module, name: str) -> torch.Tensor:
        """g = m / ‖W0 + s·B·A‖ (out,): differentiable in m, the norm a constant.

        ‖W0‖² is kept while W0 is unchanged, and the norm while W0, A and B are (tensor versions: an optimizer step
        or a load changes them in place and so invalidates it), so generating token by token does not recompute it."""
        ad = layer.adapters[name]
        w, A, B = _weight(layer), ad.lora_A, ad.lora_B
        key = (w.data_ptr(), w._version, w.dtype, A.dtype)
        cached = ad.__dict__.get("_dora_weight_sq")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                wf = w.to(A.dtype)
                cached = (key, (wf * wf).sum(1))
            ad.__dict__["_dora_weight_sq"] = cached
        norm_key = (*key, A.data_ptr(), A._version, B.data_ptr(), B._version, ad.scaling)
        norm = ad.__dict__.get("_dora_norm")
        if norm is None or norm[0] != norm_key:
            norm = (norm_key, row_norms(w, A, B, ad.scaling, cached[1]))
            ad.__dict__["_dora_norm"] = norm
        return ad.lora_magnitude_vector / norm[1]

    def forward(self, layer, name, x, result):
        ad = layer.adapters[name]
        g = self.scale(layer, name)
        bias = layer.base_layer.bias
        if result is None:  # the whole output: g ⊙ (W0·x + s·B·A·x) + b, the product on the fused path if it can
            w = _weight(layer)
            if ops.unfused_reason(x, w, ad.lora_A, ad.lora_B, ad.dropout) is None:
                y = ops.lora_linear(x, w, None, ad.lora_A, ad.lora_B, ad.scaling, ad.dropout, layer.training,
                                    consumer=layer)
            else:
                y = F.linear(x, w) + layer.lora_term(x, ad).to(x.dtype)
            g = g.to(y.dtype)
            return torch.addcmul(bias.to(y.dtype), y, g) if bias is not None else y * g
        # On top of ``result`` (several adapters, or a base called with extra arguments), as PEFT adds it:
        # (g − 1) ⊙ (result − b) + g ⊙ s·B·A·x.
        base = result - bias if bias is not None else result
        term = layer.lora_term(x, ad).to(result.dtype)
        g = g.to(result.dtype)
        return result + (g - 1) * base + g * term

    def merge_delta(self, layer, name):
        ad = layer.adapters[name]
        w = _weight(layer).to(torch.float64)
        v = w + ad.scaling * (ad.lora_B.detach().double() @ ad.lora_A.detach().double())
        g = ad.lora_magnitude_vector.detach().double() / torch.linalg.vector_norm(v, dim=1)
        ad.__dict__["_dora_merged_scale"] = g  # the unmerge divides by the same g
        return _layout(layer, g[:, None] * v - w)

    def unmerge_delta(self, layer, name):
        ad = layer.adapters[name]
        g = ad.__dict__.pop("_dora_merged_scale")
        merged = _weight(layer).to(torch.float64)
        original = merged / g[:, None] - ad.scaling * (ad.lora_B.detach().double() @ ad.lora_A.detach().double())
        return _layout(layer, merged - original)


def _weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as (out, in): a view of Conv1D's (in, out) storage."""
    return layer.weight.t() if getattr(layer, "fan_in_fan_out", False) else layer.weight


def _layout(layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An (out, in) change in the base weight's own layout."""
    return delta.t() if getattr(layer, "fan_in_fan_out", False) else delta


def merged_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ in float64, in ``weight``'s layout (for merging state dicts)."""
    w = weight.to(torch.float64)
    w = w.t() if fan_in_fan_out else w
    v = w + LF.linear_delta_weight(A.to(torch.float64), B.to(torch.float64), scaling)
    out = magnitude.to(torch.float64)[:, None] / torch.linalg.vector_norm(v, dim=1, keepdim=True) * v
    return out.t() if fan_in_fan_out else out
