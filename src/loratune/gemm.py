"""Matrix products for the fused LoRA path and the chunked loss, on oneDNN where torch's MKL is slower.

torch's CPU ``mm``/``linear`` on fp32 call MKL's sgemm, which runs well below this CPU's speed on the products of a
LoRA step (this project's machines are AMD EPYC; MKL is Intel's). oneDNN, which torch ships too, is the library
behind ``torch.ops.mkldnn._linear_pointwise``, the op torch's own compiler emits for CPU linears. It computes in
fp32 with fp32 accumulation: results agree with float64 to about 1e-6 relative, as MKL's do (tests/test_gemm.py).
Measured on 2 cores (exploratory, interleaved repeats): the LM head's logits, 512 × 576 · 576 × 49,152, take about
210 ms against 280-360 ms; the frozen linears' forward and input gradient at 512 tokens are 5-20 % faster. In
the training step, ``benchmarks/train_step.py`` times loratune with and without the routing (``loratune_mkl``).

``linear(x, w)`` is x·wᵀ (+ bias, + other) for 2-D x and w of any strides. It runs on oneDNN where this torch
build has it, the tensors are fp32 or bf16 on CPU, and the product is big enough to pay for oneDNN's per-call
cost (``MIN_MACS``); otherwise on torch.mm/addmm. ``use_onednn(False)`` or ``LORATUNE_ONEDNN=0`` turns the routing
off. Nothing here has an autograd formula: the callers are autograd functions with their own backward.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_AVAILABLE = _OP is not None and torch.backends.mkldnn.is_available()
_enabled = os.environ.get("LORATUNE_ONEDNN", "1") != "0"
_DTYPES = (torch.float32, torch.bfloat16)
# A oneDNN call costs about 15-20 µs more than torch.mm before any arithmetic (measured: 1×64·64×64 takes 23 µs
# against 4 µs), so products below this many multiply-adds (e.g. a decode step's 1 token) stay on torch.mm.
MIN_MACS = 1 << 22


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (the routing is possible at all)."""
    return _AVAILABLE


@contextlib.contextmanager
def use_onednn(flag: bool = True) -> Iterator[None]:
    """Route (or not) the products in this module to oneDNN inside the block; for comparisons and tests."""
    global _enabled
    before, _enabled = _enabled, bool(flag)
    try:
        yield
    finally:
        _enabled = before


def routed(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``linear(x, w)`` runs on oneDNN (then it always returns a new tensor)."""
    return (_enabled and _AVAILABLE and x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype
            and x.dtype in _DTYPES and x.dim() == 2 and w.dim() == 2
            and x.shape[0] * x.shape[1] * w.shape[0] >= max(MIN_MACS, 1))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           other: torch.Tensor | None = None) -> torch.Tensor:
    """x·wᵀ + bias + other: x (n, k), w (m, k), bias (m,) or None, other (n, m) or None.

    ``other`` is consumed: the result may be ``other`` itself, updated in place (torch's path accumulates into it,
    ``addmm_``, rather than making a second (n, m) tensor); callers must not use it afterwards."""
    if routed(x, w) and (bias is None or bias.dtype == x.dtype) and (other is None or other.dtype == x.dtype):
        if other is None:
            return _OP(x, w, bias, "none", [None], "")
        return _OP.binary(x, other, w, bias, "add")
    if other is None:
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())
    out = other.addmm_(x, w.t())
    return out if bias is None else out.add_(bias)
