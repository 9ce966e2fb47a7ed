"""Matrix products for the fused LoRA path and the chunked loss, on oneDNN where torch's MKL is slower.

torch's CPU ``mm``/``linear`` on fp32 call MKL's sgemm. MKL picks its kernels by CPU vendor: on AMD it runs its
AVX2 kernels even where the CPU has AVX-512. oneDNN, which torch ships too (``torch.ops.mkldnn._linear_pointwise``,
the op torch's own compiler emits for CPU linears), picks them by instruction set. It computes in fp32 with fp32
accumulation: results agree with float64 to about 1e-6 relative, as MKL's do (tests/test_gemm.py).

Measured on 2 cores (exploratory, interleaved repeats; ``benchmarks/train_step.py`` times loratune with and without
the routing, ``loratune_mkl``): on an AVX-512 AMD EPYC, oneDNN ran the LM head's logits (512 × 576 · 576 × 49,152)
in about 210 ms against MKL's 280-360 ms and the frozen linears 5-20 % faster, and loratune's step was about 10 %
faster with the routing than without. On an AVX2-only AMD EPYC (Zen 3) it was the other way round: the frozen
model's step took 1.23× as long on oneDNN as on MKL. So by default the products go to oneDNN only on a non-Intel
CPU with AVX-512 (``default_route()``); elsewhere torch.mm, i.e. MKL, as torch does.

``linear(x, w)`` is x·wᵀ (+ bias, + other) for 2-D x and w of any strides. It runs on oneDNN where the routing is
on, this torch build has oneDNN, the tensors are on CPU in fp32 (or bf16, where oneDNN runs bf16 on this CPU),
and the product is big enough to pay for oneDNN's per-call cost (``MIN_MACS``); otherwise on torch.mm/addmm.
``LORATUNE_ONEDNN=1`` or ``=0`` forces the routing on or off; ``settings.override(onednn=flag)`` sets it inside a
block.
Nothing here has an autograd formula: the callers are autograd functions with their own backward.
"""

from __future__ import annotations

import torch

from .. import settings

_MKLDNN = getattr(torch.ops, "mkldnn", None)
_OP = getattr(_MKLDNN, "_linear_pointwise", None)
_AVAILABLE = _OP is not None and torch.backends.mkldnn.is_available()


def _cpu_vendor() -> str:
    """The CPU's vendor string as the kernel reports it ('' where it cannot be read, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def default_route(capability: str | None = None, vendor: str | None = None) -> bool:
    """Whether oneDNN should take the products on this CPU: it has AVX-512 (torch's dispatch level) and is not
    Intel's, i.e. MKL would leave its widest vectors unused. Arguments override the detection, for tests."""
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    vendor = _cpu_vendor() if vendor is None else vendor
    return capability.upper().startswith("AVX512") and vendor != "GenuineIntel"


# This CPU's default, read once at import: reading it inside routing_on() broke torch.compile's graph in every LoRA
# linear (get_cpu_capability is not traceable).
_ROUTE_HERE = default_route()


def _bf16_supported() -> bool:
    """Whether oneDNN runs bf16 products on this CPU (it needs AVX-512 BF16 or AMX; without, it refuses them)."""
    check = getattr(_MKLDNN, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


_DTYPES = (torch.float32, torch.bfloat16) if _AVAILABLE and _bf16_supported() else (torch.float32,)
# A oneDNN call costs about 15-20 µs more than torch.mm before any arithmetic (measured: 1×64·64×64 takes 23 µs
# against 4 µs), so products below this many multiply-adds (e.g. a decode step's 1 token) stay on torch.mm.
MIN_MACS = 1 << 22


def routing_on() -> bool:
    """Whether the routing is on now: the CPU's default, unless ``LORATUNE_ONEDNN`` or ``settings.override(onednn=)``
    says otherwise (and this torch build has oneDNN)."""
    flag = settings.get().onednn
    return _AVAILABLE and (_ROUTE_HERE if flag is None else flag)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (the routing is possible at all)."""
    return _AVAILABLE


def routed(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``linear(x, w)`` runs on oneDNN (then it always returns a new tensor)."""
    return (routing_on() and x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype
            and x.dtype in _DTYPES and x.dim() == 2 and w.dim() == 2
            and x.shape[0] * x.shape[1] * w.shape[0] >= max(MIN_MACS, 1))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           other: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """scale·x·wᵀ + bias + other: x (n, k), w (m, k), bias (m,) or None, other (n, m) or None.

    ``other`` is consumed: the result may be ``other`` itself, updated in place (torch's path accumulates into it,
    ``addmm_``, rather than making a second (n, m) tensor); callers must not use it afterwards. On torch's path the
    scale is the GEMM's alpha (no separate pass over the result, one kernel launch fewer on a GPU)."""
    if routed(x, w) and (bias is None or bias.dtype == x.dtype) and (other is None or other.dtype == x.dtype):
        if scale != 1:  # oneDNN's op takes no scale: the scaled product, then the rest
            out = _OP(x, w, None, "none", [None], "").mul_(scale)
            out = out if bias is None else out.add_(bias)
            return out if other is None else out.add_(other)
        if other is None:
            return _OP(x, w, bias, "none", [None], "")
        return _OP.binary(x, other, w, bias, "add")
    if other is None:
        if bias is not None:
            return torch.addmm(bias, x, w.t(), alpha=scale)
        if scale == 1:
            return torch.mm(x, w.t())
        out = x.new_empty(x.shape[0], w.shape[0])  # beta=0: addmm ignores its (unset) input, NaNs included
        return torch.addmm(out, x, w.t(), beta=0, alpha=scale, out=out)
    out = other.addmm_(x, w.t(), alpha=scale)
    return out if bias is None else out.add_(bias)


def lora_forward(x2: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 A: torch.Tensor, B: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Base output plus the LoRA term; returns (out, us) where us = s·xd·Aᵀ is tokens × r.

    The scalar goes on the tokens × r factor, where it costs nothing and makes B's gradient simply gᵀ·us. xd is in
    the adapters' dtype: on a half-precision base with fp32 adapters (loratune's and PEFT's default) the LoRA
    products run in fp32, as PEFT's do, and the term is rounded once, into the base's output. The term comes first
    and the base product adds it as it writes its output (oneDNN's add post-op, or ``addmm_`` into the term), so no
    tokens × out temporary is made."""
    us = linear(xd, A, scale=s)
    return linear(x2, weight, bias, other=linear(us, B).to(x2.dtype)), us
