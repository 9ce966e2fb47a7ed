"""Dropout masks defined by a seed, so that a backward pass rebuilds them instead of saving them.

A mask is a pure function of (seed, element index, p). Element i is kept iff its byte b_i > t, or b_i == t and its
edge draw e_i ≥ f, where p·256 = t + f/2³², so P(drop) = p to within 2⁻⁴⁰. b_i is byte i % 8 (little-endian) of
word i // 8 of a SplitMix64 stream from the seed, e_i the top 32 bits of word i of a second stream from
mix64(seed ^ EDGE_KEY); word j of a stream from s is mix64(s + (j + 1)·GAMMA). SplitMix64 passes BigCrush, and a
counter-based stream lets any element's bit be recomputed from its index alone.

Two implementations compute the same bits: ``dropout_kernel.c``, compiled on first use with the system's C compiler
and cached per machine (one pass that applies the mask while drawing it, split over torch's own OpenMP threads),
and the numpy reference below, which is also the fallback where no compiler works (``LORATUNE_NATIVE=0`` forces
it).
The seed itself comes from torch's generator, so ``torch.manual_seed`` and checkpointing's RNG replay reproduce it.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

from .cpu.build import Kernel

GAMMA, EDGE_KEY = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_KERNEL_SOURCE = Path(__file__).parent / "cpu" / "dropout_kernel.c"


def new_seed() -> int:
    """A 62-bit seed from torch's default generator."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


def thresholds(p: float) -> tuple[int, int]:
    """(t, f) with p·256 = t + f/2³² (f rounded): drop iff byte < t, or byte == t and the edge draw < f."""
    if not 0 < p < 1:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    t, frac = divmod(p * 256, 1)
    return int(t), min(round(frac * 2**32), 2**32 - 1)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _stream(seed: int, words: np.ndarray) -> np.ndarray:
    """Words ``words`` (uint64 indices) of the SplitMix64 stream from ``seed``."""
    return _mix64(np.uint64(seed) + (words + np.uint64(1)) * np.uint64(GAMMA))


def keep_mask_reference(n: int, seed: int, p: float) -> np.ndarray:
    """The keep mask of elements 0..n-1 (bool), in numpy: the definition that the C kernel must reproduce."""
    t, f = thresholds(p)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as in C
        b = _stream(seed, np.arange((n + 7) // 8, dtype=np.uint64)).view(np.uint8)[:n]
        keep = b > t
        edge = np.flatnonzero(b == t)  # the byte alone cannot decide these
        if len(edge):
            seed2 = int(_mix64(np.array([seed ^ EDGE_KEY], dtype=np.uint64))[0])
            keep[edge] = (_stream(seed2, edge.astype(np.uint64)) >> np.uint64(32)) >= f
    return keep


# --- the compiled kernel -----------------------------------------------------------------------------------------
def _declare(lib: ctypes.CDLL) -> None:
    args = [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
    lib.lt_keep_mask.argtypes = [ctypes.c_void_p, *args]
    for fn in (lib.lt_dropout_f32, lib.lt_dropout_f64):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *args]
    lib.lt_keep_mask.restype = lib.lt_dropout_f32.restype = lib.lt_dropout_f64.restype = None


LIBRARY = Kernel(_KERNEL_SOURCE, _declare, without="with slower dropout")


def kernel() -> ctypes.CDLL | None:
    """The compiled dropout kernel (``cpu.build.Kernel``): None where it cannot be built, or with LORATUNE_NATIVE=0."""
    return LIBRARY.get()


def _threads() -> int:
    return LIBRARY.threads()


# --- the kernel's entry points, also as torch custom ops --------------------------------------------------------------
# Fake implementations let torch.compile and meta-device tracing see one op each; eager calls go to the kernel
# directly (through the dispatcher the custom-op path made the training step ~5 % longer, ops/blocks.py).
# Their seed is a Python int, so a compiled graph would bake one in: the compiled LoRA path uses
# ``traced.dropout_from_seed`` instead, whose seed is a tensor drawn in the graph.
def _fill_keep_mask(keep: torch.Tensor, seed: int, p: float) -> None:
    """Fill the contiguous bool ``keep`` with the keep mask of its flattened elements."""
    LIBRARY.lib.lt_keep_mask(keep.data_ptr(), 0, keep.numel(), seed, *thresholds(p), _threads())


def _dropout_into(src: torch.Tensor, out: torch.Tensor, seed: int, p: float) -> None:
    """out = src ⊙ keep for a float32/float64 CPU ``src`` and a contiguous ``out`` of its size (``out`` may be src)."""
    fn = LIBRARY.lib.lt_dropout_f32 if src.dtype == torch.float32 else LIBRARY.lib.lt_dropout_f64
    src = src.contiguous()
    fn(src.data_ptr(), out.data_ptr(), 0, src.numel(), seed, *thresholds(p), _threads())


_keep_mask_op = torch.library.custom_op("loratune::dropout_keep_mask", _fill_keep_mask, mutates_args=("keep",))
_seeded_dropout_op = torch.library.custom_op("loratune::seeded_dropout", _dropout_into, mutates_args=("out",))
_keep_mask_op.register_fake(lambda keep, seed, p: None)
_seeded_dropout_op.register_fake(lambda src, out, seed, p: None)


# --- masks on tensors --------------------------------------------------------------------------------------------
def keep_mask(shape: torch.Size, seed: int, p: float) -> torch.Tensor:
    """The bool keep mask of a tensor of ``shape`` (CPU), element i of its flattened form being mask bit i."""
    if kernel() is None:
        return torch.from_numpy(keep_mask_reference(shape.numel(), seed, p)).view(shape)
    keep = torch.empty(shape, dtype=torch.bool)
    (_keep_mask_op if torch.compiler.is_compiling() else _fill_keep_mask)(keep, seed, p)
    return keep


def multiply_by_mask(src: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = src ⊙ keep for a bool ``keep`` of src's size, any device. float × bool runs an unvectorized
    type-promotion loop on CPU (~20× a float multiply); bool -> uint8 -> float, both vectorized, does not."""
    return torch.mul(src, keep.view(src.shape).view(torch.uint8).to(src.dtype), out=out)


def apply_mask(src: torch.Tensor, seed: int, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = src ⊙ keep (no 1/(1-p) rescale: callers fold it into a scalar). ``out`` may be ``src`` (in place)."""
    if src.device.type != "cpu":
        raise ValueError(f"seeded dropout masks are computed on the CPU; got a tensor on {src.device}")
    out = torch.empty_like(src, memory_format=torch.contiguous_format) if out is None else out
    if kernel() is None or src.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        return multiply_by_mask(src, keep_mask(src.shape, seed, p), out)
    (_seeded_dropout_op if torch.compiler.is_compiling() else _dropout_into)(src, out, seed, p)
    return out
