"""NF4: bitsandbytes' 4-bit NormalFloat weights with double-quantized block scales, bit for bit, in torch.

The format (what ``bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)`` writes, and
what its ``Linear4bit`` holds):

* The weight is read flat (row-major) in blocks of ``blocksize`` values (64 by default). A last block may be short
  (when the size is not a multiple of the block size): it is scaled by its own absmax, as bitsandbytes does, so
  nothing is padded but the final nibble of an odd count.
* Each value x of a block with absmax m becomes the index of the nearest of the 16 NF4 values (``NF4_CODE``) to
  x/m; x/m is x·(1/m) in a full block and x/m in the short last one (bitsandbytes' torch code); a value exactly
  half-way between two codes goes to the lower one. A block of zeros has m = 0 and codes 7 (the value 0).
* Two codes per byte, the first value in the high nibble (``packed``, ceil(n/2) bytes; an odd count ends with
  code 7 in the low nibble).
* Double quantization: the per-block absmaxes minus their mean (``offset``) are quantized to 8 bits in blocks of
  256 with bitsandbytes' signed dynamic map (``DYNAMIC_CODE``), each such block scaled by its own absmax
  (``absmax2``, fp32). bitsandbytes' CPU kernel rounds to the nearest code through a 65,536-entry table over
  [-1, 1] (``_code8``): a value within half a table step (1.5e-5) of the midpoint between two codes can take either
  neighbour. loratune rebuilds that table, so its codes are those bitsandbytes writes on CPU. (Its CUDA kernel
  searches the code itself, so there an occasional 8-bit code differs by one step: a block scale differs by at
  most ~1e-4 of its 256-block's absmax.)
* Dequantizing: scale_b = DYNAMIC_CODE[q_b]·absmax2[b // 256] + offset (two fp32 roundings, as bitsandbytes), then
  w = NF4_CODE[c]·scale_b in fp32, rounded to the output dtype (to nearest even for bf16).

Storage per weight at blocksize 64: 4 bits + 8/64 (block codes) + 32/(64·256) (absmax2) = 4.127 bits, plus 4 bytes
of offset per tensor; without double quantization 4 + 32/64 = 4.5 bits. The two code tables are constants of the
format, not stored per tensor. ``tests/quant/test_nf4.py`` checks codes, scales and values against bitsandbytes.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import ConfigError, LoraTuneError

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes
SCALE_BLOCK = 256  # bitsandbytes' block size for the double quantization of the absmaxes
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1] with an exact 0 (Dettmers et al. 2023, as bitsandbytes
# tabulates them).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
ZERO_CODE = 7  # NF4_CODE[7] == 0


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: for e = 0..6, the 2^e midpoints of 2^e equal steps over [0.1, 1]
    (fp32), times 10^(e-6), with both signs; and 0 and 1. 256 values, sorted."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist() + ((-(10 ** (e - 6))) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # a value on a bound goes to the lower code (torch.bucketize)
_LUT_STEPS = 65536  # bitsandbytes' CPU table for the 8-bit codes


@functools.cache
def _code8_table() -> torch.Tensor:
    """The code bitsandbytes' CPU kernel gives each of its 65,536 grid points -1 + 2i/65535: the number of midpoints
    between consecutive DYNAMIC_CODE values that lie below the point (every step in fp32, as the kernel computes)."""
    mids = (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * 0.5
    i = torch.arange(_LUT_STEPS, dtype=torch.float32)
    grid = -1.0 + (2.0 * i) / torch.full_like(i, _LUT_STEPS - 1)  # a true division, as the kernel's
    return torch.searchsorted(mids, grid).to(torch.uint8)


def _code8(v: torch.Tensor, blocksize: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 8-bit blockwise quantization on CPU of a flat fp32 ``v``: (uint8 codes, fp32 absmax per block).

    Per block: m = max|v|; t = clamp(v·(1/m), -1, 1); the grid index trunc((t+1)·0.5·65535 + 0.5), each operation
    rounded to fp32; the code is that grid point's (``_code8_table``). A block of zeros gets m = 0 and codes 0."""
    n = v.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(v, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.ones_like(absmax) / absmax  # 1/m, a true division (inf for m = 0: those blocks are set below)
    t = torch.clamp(padded * inv[:, None], -1.0, 1.0)
    idx = (((t + 1.0) * 0.5) * float(_LUT_STEPS - 1) + 0.5).to(torch.int64)
    idx = idx.clamp_(0, _LUT_STEPS - 1)  # (NaN from a zero block: replaced below)
    codes = _code8_table().to(v.device)[idx]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def _quantize_full_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes (int32, one per value) and absmaxes of whole blocks of a flat fp32 tensor."""
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    return torch.bucketize(scaled, _NF4_BOUNDS.to(flat.device), out_int32=True), absmax


_QUANT_CHUNK = 1 << 18  # values per pass: quantizing holds a few fp32 temporaries of this size (1 MiB), not of
# the weight


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"NF4 blocksize {blocksize!r} is not supported; use one of {', '.join(map(str, BLOCKSIZES))} "
                          "(bitsandbytes' sizes; 64 is QLoRA's)")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """``weight`` (fp32, bf16 or fp16, any shape) in NF4, as bitsandbytes' ``quantize_4bit(weight, blocksize=...,
    compress_statistics=double_quant, quant_type="nf4")`` stores it (see the module doc). On CPU the compiled kernel
    (``native.quantize_into``) does it in one pass, else torch ops; both give the same bits."""
    from . import native  # (the compiled kernel; imported late: native imports this module)

    if not isinstance(weight, torch.Tensor) or weight.dtype not in WEIGHT_DTYPES:
        what = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ConfigError(f"cannot quantize a {what} weight to NF4; give a float32, bfloat16 or float16 tensor")
    _check_blocksize(blocksize)
    n = weight.numel()
    if n == 0:
        raise ConfigError("cannot quantize an empty weight to NF4; leave this module out of quantization")
    weight = weight.detach()
    flat = weight.reshape(-1)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    # the kernel on an fp32 weight makes no temporaries: one pass; else chunks bound the fp32 temporaries
    whole = (flat.dtype == torch.float32 and flat.is_contiguous() and flat.device.type == "cpu"
             and native.LIBRARY.get() is not None)
    step = n if whole else max(blocksize, _QUANT_CHUNK // blocksize * blocksize)
    for start in range(0, n, step):  # chunks of whole blocks (the last may end in a short one): whole bytes
        stop = min(start + step, n)
        chunk = flat[start:stop].float().contiguous()
        out, scales = packed[start // 2:(stop + 1) // 2], absmax[start // blocksize:-(-stop // blocksize)]
        finite = native.quantize_into(chunk, _NF4_BOUNDS, blocksize, out, scales)
        if finite is None:  # the torch path
            codes, found = _quantize_chunk(chunk, blocksize)
            out.copy_(codes)
            scales.copy_(found)
            finite = bool(torch.isfinite(found).all())  # (a NaN or an infinity makes its block's absmax so)
        if not finite:
            raise LoraTuneError(f"the weight (shape {tuple(weight.shape)}) holds NaN or infinite values, which NF4 "
                                "cannot store; the base model is damaged (load a clean copy)")
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, weight.shape, weight.dtype, blocksize)
    offset = absmax.mean()
    codes8, absmax2 = _code8(absmax - offset)
    return NF4Tensor(packed, codes8, absmax2, offset, weight.shape, weight.dtype, blocksize)


def _quantize_chunk(chunk: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, absmax per block) of a flat fp32 chunk starting at a block, in torch ops; its absmax is NaN
    or infinite where a block holds such a value."""
    n = chunk.numel()
    full = n - n % blocksize
    codes, absmax = _quantize_full_blocks(chunk[:full], blocksize) if full else (chunk.new_empty(0, dtype=torch.int32),
                                                                                chunk.new_empty(0))
    if full < n:  # the short last block: scaled by its own absmax, divided (bitsandbytes' tail)
        tail = chunk[full:]
        am = tail.abs().max().clamp(min=1e-38)
        scaled = torch.clamp(tail / am, -1, 1)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad nibble: code 7 (0.0)
        codes = torch.cat((codes, torch.bucketize(scaled, _NF4_BOUNDS.to(chunk.device), out_int32=True)))
        absmax = torch.cat((absmax, am.reshape(1)))
    return ((codes[::2] << 4) | codes[1::2]).to(torch.uint8), absmax


class NF4Tensor:
    """A weight in NF4 (see the module doc): ``packed`` codes, block scales (``absmax``: uint8 codes with
    ``absmax2``/``offset`` under double quantization, else fp32), its ``shape`` and the ``dtype`` that
    ``dequantize()`` gives by default. Not a torch.Tensor: it stands for one, frozen, and is read through
    ``dequantize``; ``shape``, ``dtype``, ``device`` and ``is_floating_point()`` describe the weight it stands for."""

    __slots__ = ("packed", "absmax", "absmax2", "offset", "shape", "dtype", "blocksize")
    requires_grad = False

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                 offset: torch.Tensor | None, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                 blocksize: int):
        self.packed, self.absmax, self.absmax2, self.offset = packed, absmax, absmax2, offset
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, blocksize

    # --- what it stands for --------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return True

    def state(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``offset`` a 0-d fp32 tensor), without the constant code tables."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax2=self.absmax2, offset=self.offset)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes stored for this weight: codes, block scales and their double-quantization state."""
        return sum(t.numel() * t.element_size() for t in self.state().values())

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel()

    def to(self, device: torch.device | str) -> NF4Tensor:
        return NF4Tensor(*(None if t is None else t.to(device) for t in
                           (self.packed, self.absmax, self.absmax2, self.offset)), self.shape, self.dtype,
                         self.blocksize)

    def __repr__(self) -> str:
        dq = "double-quantized scales" if self.double_quant else "fp32 scales"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {dq}, "
                f"{self.bits_per_weight():.3f} bits/weight, device={self.device})")

    # --- reading it ----------------------------------------------------------------------------------------------
    def block_scales(self, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """The fp32 absmax of blocks [first, stop) (all by default), double quantization undone as bitsandbytes
        does: code·absmax2, then + offset."""
        stop = self.absmax.numel() if stop is None else stop
        q = self.absmax[first:stop]
        if not self.double_quant:
            return q.float()
        group = torch.arange(first, stop, device=q.device) // SCALE_BLOCK
        return DYNAMIC_CODE.to(q.device)[q.long()] * self.absmax2[group] + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a new tensor of ``dtype`` (default ``self.dtype``): exactly bitsandbytes'
        ``dequantize_4bit``."""
        return self.dequantize_flat(0, self.numel(), dtype).view(self.shape)

    def dequantize_rows(self, first: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [first, stop) of a 2-D weight; ``first·columns`` must be a multiple of the block size."""
        cols = self.shape[-1]
        return self.dequantize_flat(first * cols, stop * cols, dtype).view(stop - first, cols)

    def dequantize_flat(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Values [start, stop) of the flat weight; ``start`` must be a multiple of the block size."""
        from . import native  # (the compiled kernel, or None; imported late: native imports this module)

        dtype = self.dtype if dtype is None else dtype
        if dtype not in DEQUANT_DTYPES:
            raise ConfigError(f"cannot dequantize NF4 to {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
        if start % self.blocksize or not 0 <= start <= stop <= self.numel():
            raise ValueError(f"dequantize_flat({start}, {stop}): start must be a multiple of {self.blocksize} "
                             f"within 0..{self.numel()}")
        first, last = start // self.blocksize, -(-stop // self.blocksize)
        scales = self.block_scales(first, last)
        codes = self.packed[start // 2:(stop + 1) // 2]
        out = native.dequantize(codes, scales, stop - start, self.blocksize, dtype)
        return out if out is not None else _dequantize_torch(codes, scales, stop - start, self.blocksize, dtype)


@functools.cache
def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the NF4 values of a byte's high and low nibble."""
    b = torch.arange(256)
    return torch.stack((NF4_CODE[b >> 4], NF4_CODE[b & 15]), dim=1).to(device)


def _dequantize_torch(codes: torch.Tensor, scales: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype
                      ) -> torch.Tensor:
    """n values from packed ``codes`` (starting at a block) and their blocks' fp32 ``scales``, in torch ops (any
    device): NF4_CODE[c]·scale in fp32, then cast."""
    values = _pair_table(codes.device)[codes.long()].view(-1)[:n]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full].view(-1, blocksize).copy_(values[:full].view(-1, blocksize) * scales[:full // blocksize, None])
    if full < n:
        out[full:] = values[full:] * scales[-1]
    return out if dtype == torch.float32 else out.to(dtype)
