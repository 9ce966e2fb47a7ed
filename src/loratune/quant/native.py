"""The compiled NF4 kernels (``nf4_kernel.c``), built and cached like loratune's other C kernels.

``dequantize(codes, scales, n, blocksize, dtype)`` returns the values and ``quantize_into(values, bounds, ...)``
writes the packed codes and block absmaxes, bit for bit those of nf4.py's torch path; each returns None where the kernel
does not apply (not on CPU, fp16 output, no compiler, or ``LORATUNE_NATIVE=0``): the caller then runs the torch
path.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..ops.cpu.build import Kernel


def _declare(lib: ctypes.CDLL) -> None:
    ptr, n, th = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn in (lib.lt_nf4_dequant_f32, lib.lt_nf4_dequant_bf16):
        fn.argtypes = [ptr, ptr, ptr, n, n, th]
        fn.restype = None
    lib.lt_nf4_quant_f32.argtypes = [ptr, ptr, ptr, ptr, n, n, th]
    lib.lt_nf4_quant_f32.restype = ctypes.c_int


LIBRARY = Kernel(Path(__file__).with_name("nf4_kernel.c"), _declare,
                 without="with NF4 weights dequantized by torch ops")
_FUNCTIONS = {torch.float32: "lt_nf4_dequant_f32", torch.bfloat16: "lt_nf4_dequant_bf16"}


def dequantize(codes: torch.Tensor, scales: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype
               ) -> torch.Tensor | None:
    """n values from the packed ``codes`` (uint8, starting at a block) and their blocks' fp32 ``scales``; None where
    the kernel does not apply."""
    if (codes.device.type != "cpu" or dtype not in _FUNCTIONS
            or not codes.is_contiguous() or not scales.is_contiguous() or scales.dtype != torch.float32):
        return None
    lib = LIBRARY.get()
    if lib is None:
        return None
    out = torch.empty(n, dtype=dtype)
    getattr(lib, _FUNCTIONS[dtype])(codes.data_ptr(), scales.data_ptr(), out.data_ptr(), n, blocksize,
                                    LIBRARY.threads())
    return out


def quantize_into(values: torch.Tensor, bounds: torch.Tensor, blocksize: int, packed: torch.Tensor,
                  absmax: torch.Tensor) -> bool | None:
    """Quantize the flat fp32 ``values`` (blocks from the start, the last possibly short) into ``packed`` (uint8,
    ceil(n/2)) and ``absmax`` (fp32, one per block), ``bounds`` the 15 fp32 midpoints between NF4 values; returns
    whether every value was finite, or None where the kernel does not apply (then nothing is written).

    One thread: quantizing a model takes well under a second on one core, and OpenMP threads on a loaded machine
    wait for each other far longer than that."""
    if (values.device.type != "cpu" or values.dtype != torch.float32 or not values.is_contiguous()
            or not packed.is_contiguous() or not absmax.is_contiguous()):
        return None
    lib = LIBRARY.get()
    if lib is None:
        return None
    bad = lib.lt_nf4_quant_f32(values.data_ptr(), bounds.contiguous().data_ptr(), packed.data_ptr(),
                               absmax.data_ptr(), values.numel(), blocksize, 1)
    return not bad
