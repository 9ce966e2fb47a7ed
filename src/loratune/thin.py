"""The thin (rank-r) products of the fused LoRA path, on a compiled kernel where it applies.

Each LoRA linear runs six products with one dimension r (16 at most, typically): x⊙m·Aᵀ and u·Bᵀ forward, and
g·B, (g·B)·A and the adapters' gradients backward. A BLAS treats these as small, badly shaped GEMMs and pays its
setup, packing and (for oneDNN through torch) 20 µs of per-call cost on each, so they ran at a quarter of the base
products' speed on the AVX-512 machine. ``thin_kernel.c`` (built and cached like the dropout kernel by
``native.py``) keeps each output vector in a register over the long dimension and packs nothing.

The three shapes (``T`` tokens, ``d`` features, ``r`` the rank):

* ``project(x, mt, s)``  = s·x·mt,   (T×d)·(d×r) -> T×r
* ``expand(u, m, s)``    = s·u·m,    (T×r)·(r×d) -> T×d
* ``outer(x, u, s)``     = s·xᵀ·u,   (d×T)·(T×r) -> d×r

Each takes the kernel for float32 CPU tensors where it is built and on (by default: an AVX-512 build, r = 16, 32, …,
``_wide_enough``), and otherwise ``gemm.linear`` or ``torch.mm``, as before the kernel existed; tests/test_thin.py
checks both against float64. ``expand(..., keep=)`` applies a seeded dropout mask as it writes, and with
``out=, accumulate=True`` it adds into a given tensor: where the base product runs on oneDNN, the fused path adds
the LoRA term into the base product's new output, forward and backward, so the term never exists as a tokens × d
tensor of its own.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import dropout as seeded
from . import gemm, native


def _declare(lib: ctypes.CDLL) -> None:
    ptr, n, f, th = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lt_thin_project.argtypes = [ptr, n, ptr, n, ptr, n, n, n, f, th]
    lib.lt_thin_outer.argtypes = [ptr, n, ptr, n, ptr, n, n, n, f, th]
    lib.lt_thin_expand.argtypes = [ptr, ptr, ptr, n, n, n, f, th, th, ctypes.c_uint64, ctypes.c_uint32,
                                   ctypes.c_uint32, th]
    lib.lt_thin_lanes.argtypes, lib.lt_thin_lanes.restype = [], ctypes.c_int
    lib.lanes = lib.lt_thin_lanes()  # fixed by the build; read once, not on every product
    for fn in (lib.lt_thin_project, lib.lt_thin_outer, lib.lt_thin_expand):
        fn.restype = None


LIBRARY = native.Kernel(Path(__file__).with_name("thin_kernel.c"), _declare,
                        without="with the rank-r products on torch's matrix library")


def _mode_from_env() -> str:
    """LORATUNE_THIN: "auto" (unset; see ``_wide_enough``), "1" (on for every rank) or "0" (off)."""
    value = os.environ.get("LORATUNE_THIN", "").strip().lower()
    if value in ("", "auto", "1", "on", "true", "0", "off", "false"):
        return value or "auto"
    warnings.warn(f"LORATUNE_THIN={value!r} is not understood, so the CPU and the rank decide; set it to 1 (the "
                  "thin kernel on), 0 (off) or leave it unset", stacklevel=2)
    return "auto"


_MODE = _mode_from_env()
_enabled = True  # tests and benchmarks switch the kernel off with ``use_kernel(False)``


def use_kernel(flag: bool = True) -> bool:
    """Turn the kernel on or off for this process (for comparisons and tests); returns the previous setting."""
    global _enabled
    before, _enabled = _enabled, bool(flag)
    return before


def _wide_enough(lib: ctypes.CDLL, rank: int) -> bool:
    """Whether the built kernel should take rank-``rank`` products by default.

    Where it was built for AVX-512 (16 lanes) and the rank fills whole vectors: the whole training step took
    0.96-0.98× as long with it as with oneDNN's products at r = 16 (in-step A/Bs and the 2026-12-01 h benchmark run
    on the Zen 5 VM). At r = 8, padded to 16 lanes, half of its multiply-adds are on zeros, and the q,v r8 step took
    1.025× as long, so other ranks stay on the matrix libraries. An AVX2 build, run against MKL on the same CPU,
    took 0.975-1.010× as long, no clear gain, so without AVX-512 it is off. ``LORATUNE_THIN=1`` forces it on for
    every rank, ``LORATUNE_THIN=0`` off everywhere."""
    if _MODE in ("0", "off", "false"):
        return False
    lanes = lib.lanes
    return _MODE in ("1", "on", "true") or (lanes >= 16 and rank % lanes == 0)


def applies(big: torch.Tensor, small: torch.Tensor, rank: int) -> bool:
    """Whether the kernel takes a rank-``rank`` product of these 2-D tensors: both float32 on the CPU, ``big`` (the
    tokens-long one) in rows of unit stride (``small``, r wide, is copied where it is not contiguous), the kernel
    built and on (``use_kernel``, ``LORATUNE_THIN``, ``_wide_enough``)."""
    if not _enabled or big.stride(1) != 1:
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (big, small)):
        return False
    lib = LIBRARY.get()
    return lib is not None and _wide_enough(lib, rank)


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t (rows × r) as a contiguous rows × rp tensor, rp = r rounded up to the kernel's whole vectors (16 floats
    with AVX-512, 8 otherwise), zeros in the padding."""
    r, lanes = t.shape[1], LIBRARY.lib.lanes
    rp = -(-r // lanes) * lanes
    return t.contiguous() if rp == r else F.pad(t, (0, rp - r)).contiguous()


def project(x: torch.Tensor, mt: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·x·mt for x (T, d) and mt (d, r): a new contiguous (T, r) tensor."""
    if not applies(x, mt, mt.shape[1]):
        return gemm.linear(x, mt.t(), scale=scale)
    (T, d), r = x.shape, mt.shape[1]
    mt = _padded(mt)
    out = x.new_empty(T, r)
    LIBRARY.lib.lt_thin_project(x.data_ptr(), x.stride(0), mt.data_ptr(), mt.shape[1], out.data_ptr(), T, d, r,
                                scale, LIBRARY.threads())
    return out


def outer(x: torch.Tensor, u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale·xᵀ·u for x (T, d) and u (T, r): a new contiguous (d, r) tensor."""
    if not applies(x, u, u.shape[1]):
        return x.t().mm(u) if scale == 1 else torch.mm(x.t(), u).mul_(scale)
    (T, d), r = x.shape, u.shape[1]
    u = _padded(u)
    out = x.new_empty(d, r)
    LIBRARY.lib.lt_thin_outer(x.data_ptr(), x.stride(0), u.data_ptr(), u.shape[1], out.data_ptr(), T, d, r, scale,
                              LIBRARY.threads())
    return out


def expand(u: torch.Tensor, m: torch.Tensor, scale: float = 1.0, out: torch.Tensor | None = None,
           accumulate: bool = False, keep: tuple[int, float] | None = None) -> torch.Tensor:
    """scale·u·m for u (T, r) and m (r, d): a (T, d) tensor. With ``out`` (contiguous, (T, d)) it is written
    there, or added to it with ``accumulate``, and ``out`` is returned. ``keep=(seed, p)`` multiplies the product
    by that seeded dropout draw's keep mask (``dropout.py``; over the (T, d) result's flattened index) before it is
    written or added."""
    if accumulate and out is None:
        raise ValueError("expand: accumulate=True needs the tensor to add into, out=")
    if out is not None and (out.shape != (u.shape[0], m.shape[1]) or not out.is_contiguous()):
        raise ValueError(f"expand: out must be a contiguous ({u.shape[0]}, {m.shape[1]}) tensor, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if not (applies(u.contiguous(), m, u.shape[1]) and (out is None or out.dtype == torch.float32)):
        res = gemm.linear(u, m.t(), scale=scale)
        if keep is not None:
            res = seeded.apply_mask(res, *keep, out=res)
        if out is None:
            return res
        return out.add_(res) if accumulate else out.copy_(res)
    (T, r), d = u.shape, m.shape[1]
    u, m = u.contiguous(), m.contiguous()
    out = u.new_empty(T, d) if out is None else out
    seed, p = keep if keep is not None else (0, 0.5)
    LIBRARY.lib.lt_thin_expand(u.data_ptr(), m.data_ptr(), out.data_ptr(), T, d, r, scale, int(accumulate),
                               int(keep is not None), seed, *seeded.thresholds(p), LIBRARY.threads())
    return out
