"""``NF4Linear``: a frozen ``nn.Linear`` whose weight is stored in NF4 (``nf4.py``), for QLoRA.

y = x·Ŵᵀ + b with Ŵ the dequantized weight, computed in ``compute_dtype`` (fp32 or bf16; the input is cast to it and
the output back, as bitsandbytes' ``Linear4bit`` does). The weight never trains, and neither the forward nor the
backward keeps a full-precision copy of it: both dequantize it again, in row chunks of at most ``CHUNK`` values on
CPU (the compiled kernel of ``native.py``, or torch ops), each chunk living only as long as its product (through
``ops.gemm``, so on the matrix library loratune's LoRA linears use); off CPU (CUDA) the whole weight, freed after its
product. The backward computes only x's gradient (and the bias's, where it trains), g·Ŵ.

It is an ``nn.Linear`` subclass, so whatever looks for linears (PEFT's "all-linear", transformers) still finds it;
LoRA wraps it like any Linear (``adapters.layers.LAYER_TYPES``). On LoRA's fused path the layer lends its weight
dequantized for the one product (``dense_weight()``), and autograd saves the 4-bit weight in its place, so there too
the backward dequantizes again and no full-precision copy outlives its product (docs/qlora.md); LoRA's general
path calls the layer itself and adds its term. ``weight`` is the
``NF4Tensor`` (shape (out, in), dtype the compute dtype), not a Parameter; the stored tensors are buffers, so
``.to(device)``, ``state_dict`` and ``deepcopy`` work, and dtype casts of the model leave the fp32 scales alone.
Merging into it (``add_to_weight``) is refused unless forced: see that method.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, LoraTuneError
from ..ops import gemm
from .nf4 import NF4Tensor, quantize_nf4

COMPUTE_DTYPES = (torch.float32, torch.bfloat16)
CHUNK = 1 << 20  # weight values dequantized at a time on CPU (4 MiB in fp32): SmolLM2's linears take one chunk
MERGE_PROBE_ROWS = 64  # random inputs on which a forced merge measures a layer's output change


@dataclass
class LayerMergeNote:
    """One layer's forced merge into 4 bits: the relative change of its outputs from re-rounding W+ΔW (against a
    full-precision merge), and the adapter's own relative change of the same outputs, both on random inputs."""

    shape: tuple[int, int]
    rounding: float
    adapter: float


# Set by merge.forced_merge_report around a whole model's merge: the layers record their notes there and the report
# gives one warning; unset, each layer warns on its own.
NOTES: ContextVar[list[LayerMergeNote] | None] = ContextVar("loratune_nf4_merge_notes", default=None)


def check_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"NF4 compute dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    return dtype


def row_chunks(weight: NF4Tensor, chunk: int | None = None) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of a 2-D NF4 weight, of about ``chunk`` values each, each starting at a block."""
    rows, cols = weight.shape
    unit = math.lcm(cols, weight.blocksize) // cols  # rows that span whole blocks
    step = max(unit, (chunk or CHUNK) // cols // unit * unit)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def nf4_linear(x2: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x2·Ŵᵀ + bias for 2-D x2 in ``dtype`` (no autograd)."""
    if x2.device.type != "cpu":
        return torch.nn.functional.linear(x2, weight.dequantize(dtype), bias)
    chunks = row_chunks(weight)
    if len(chunks) == 1:
        return gemm.linear(x2, weight.dequantize(dtype), bias)
    out = x2.new_empty(x2.shape[0], weight.shape[0])
    for r0, r1 in chunks:
        part = gemm.linear(x2, weight.dequantize_rows(r0, r1, dtype), None if bias is None else bias[r0:r1])
        out[:, r0:r1] = part
    return out


def nf4_linear_grad(g: torch.Tensor, weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g·Ŵ for 2-D g (tokens × out) in ``dtype``: x's gradient, the weight dequantized again chunk by chunk."""
    if g.device.type != "cpu":
        return g.mm(weight.dequantize(dtype))
    gx = None
    for r0, r1 in row_chunks(weight):  # gx += g[:, rows]·Ŵ[rows]
        gx = gemm.linear(g[:, r0:r1], weight.dequantize_rows(r0, r1, dtype).t(), other=gx)
    return gx


class NF4LinearFunction(torch.autograd.Function):
    """x2·Ŵᵀ + b; the backward dequantizes Ŵ again for x's gradient. Saves no tensor: Ŵ's 4-bit state stays
    referenced by the ``NF4Tensor`` (the module's buffers), nothing full-precision."""

    @staticmethod
    def forward(ctx, x2, bias, weight, dtype):
        ctx.weight, ctx.dtype, ctx.has_bias = weight, dtype, bias is not None
        return nf4_linear(x2, weight, bias, dtype)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        need_x, need_bias = ctx.needs_input_grad[:2]
        grad_x = nf4_linear_grad(g, ctx.weight, ctx.dtype) if need_x else None
        grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_bias, None, None


class NF4Linear(nn.Linear):
    """A frozen linear layer with an NF4 weight (see the module doc). Make one with ``NF4Linear.from_linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, blocksize: int = 64, double_quant: bool = True,
                 device: torch.device | str | None = None):
        """An empty layer (zero weight) of this shape, e.g. to ``load_state_dict`` into."""
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = check_compute_dtype(compute_dtype)
        self.set_weight(quantize_nf4(torch.zeros(out_features, in_features, device=device), blocksize, double_quant))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32, blocksize: int = 64,
                    double_quant: bool = True) -> NF4Linear:
        """``linear``'s weight in NF4, its bias (the same Parameter) as it is."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.compute_dtype = check_compute_dtype(compute_dtype)
        layer.set_weight(quantize_nf4(linear.weight, blocksize, double_quant))
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    # --- the weight ----------------------------------------------------------------------------------------------
    def set_weight(self, q: NF4Tensor) -> None:
        """Store ``q`` (shaped out × in) as this layer's weight."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"an NF4 weight of shape {tuple(q.shape)} does not fit a "
                             f"{self.in_features}→{self.out_features} linear")
        self.blocksize, self.double_quant = q.blocksize, q.double_quant
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax2", q.absmax2)
        self.register_buffer("offset", q.offset)

    @property
    def weight(self) -> NF4Tensor:
        return NF4Tensor(self.packed, self.absmax, self.absmax2, self.offset, (self.out_features, self.in_features),
                         self.compute_dtype, self.blocksize)

    @contextlib.contextmanager
    def dense_weight(self) -> Iterator[torch.Tensor]:
        """The weight dequantized to the compute dtype, for one product inside the block (LoRA's fused path,
        ``adapters.layers.LinearLora``, runs its frozen product on it). Autograd nodes made inside the block that
        save this tensor save the 4-bit weight in its place (``saved_tensors_hooks``) and dequantize it again in
        the backward, so the full-precision copy lives only as long as the block."""
        nf4, dtype = self.weight, self.compute_dtype
        dense = nf4.dequantize(dtype)
        target = weakref.ref(dense)  # (the graph keeps the hooks: a strong reference would keep the copy alive)

        def pack(t: torch.Tensor):
            return nf4 if t is target() else t

        def unpack(t):
            return t.dequantize(dtype) if isinstance(t, NF4Tensor) else t

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield dense

    def dequantized_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight in ``dtype`` (what an adapter trained on this layer
        saw) and a copy of the bias."""
        w = self.weight.dequantize(dtype)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype)
        out.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=self.bias.requires_grad)
        return out.train(self.training)

    def add_to_weight(self, delta: torch.Tensor, safe: bool = False, force: bool = False) -> None:
        """W += delta, rounded to NF4 again: the hook ``LoraLayer.merge``/``unmerge`` call for this base.

        Refused unless ``force``: the adapter was trained against this layer's 4-bit weight, and requantizing
        W + ΔW moves every weight to a neighbouring 4-bit level, typically by more than ΔW itself. With ``force``
        it is done and a warning says by how much, measured: this layer's outputs on ``MERGE_PROBE_ROWS`` random
        inputs from Q(W+ΔW) against W+ΔW's (a full-precision merge), beside the adapter's own change of them
        (ΔW's). Inside ``merge.forced_merge_report`` the figures are recorded instead, for one warning per model
        that also gives the model's output error."""
        if not force:
            raise LoraTuneError(
                f"refusing to merge into the 4-bit NF4 weight of a {self.in_features}→{self.out_features} linear: "
                "rounding W+ΔW to 4 bits again adds error, typically more than the adapter's own change; merge into "
                "a full-precision copy instead (loratune.quant.dequantize_model(model) first), or pass force=True")
        w = self.weight.dequantize(torch.float32).double()
        delta = delta.detach().to(w.device).double()
        target = w + delta
        if not torch.isfinite(target).all():
            raise LoraTuneError(f"merging gives non-finite weights in a {self.in_features}→{self.out_features} NF4 "
                                "linear; the adapter is broken (retrain it, or check its file)")
        q = quantize_nf4(target.float(), self.blocksize, self.double_quant)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(MERGE_PROBE_ROWS, self.in_features, generator=g, dtype=torch.float64).to(w.device)
        exact = x @ target.T
        scale = exact.norm().clamp(min=1e-300)
        note = LayerMergeNote((self.out_features, self.in_features),
                              ((x @ (q.dequantize(torch.float32).double() - target).T).norm() / scale).item(),
                              ((x @ delta.T).norm() / scale).item())
        self.set_weight(q.to(self.packed.device))
        notes = NOTES.get()
        if notes is not None:
            notes.append(note)
            return
        warnings.warn(f"merged into the 4-bit weight of a {self.in_features}→{self.out_features} NF4 linear "
                      f"(force=True): rounding W+ΔW to 4 bits again changes its outputs by {note.rounding:.2%} "
                      f"against a full-precision merge (measured on random inputs), where the adapter changes them "
                      f"by {note.adapter:.2%}; merge into a full-precision copy instead (loratune.quant."
                      "dequantize_model first) to keep the adapter exact", stacklevel=3)

    # --- module plumbing -----------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Device moves reach the 4-bit state; dtype casts (``model.to(torch.bfloat16)``) leave its fp32 scales
        alone, as bitsandbytes does (the bias follows the cast; the compute dtype stays)."""
        floats = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for key, before in floats.items():
            after = self._buffers[key]
            if after.dtype != before.dtype:
                self._buffers[key] = before.to(after.device)
        return self

    def reset_parameters(self) -> None:  # nn.Linear's would initialise a weight this layer does not have
        pass

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise RuntimeError(f"NF4Linear({self.in_features}→{self.out_features}) got an input of last dimension "
                               f"{x.shape[-1]}")
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        x2 = x.to(dtype).reshape(-1, self.in_features)
        if torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)):
            out = NF4LinearFunction.apply(x2, bias, self.weight, dtype)
        else:
            out = nf4_linear(x2, self.weight, bias, dtype)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
