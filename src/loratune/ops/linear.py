"""A fast LoRA linear for training: y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ in one autograd node.

Why not just autograd over ``lora_linear_reference``? With a frozen base, the work a LoRA step must do is the base
forward, the input-gradient half of the base backward and six thin (tokens × r) matmuls per module. The reference
path adds, per module, a float dropout mask and a dropped-out copy of x (both saved), a scaling multiply and an add
over the full output, and as many autograd nodes; on CPU the dropout's random numbers alone cost about half a base
matmul. Here:

* the base product adds the LoRA term as it writes its output (oneDNN's add post-op, or ``addmm_`` into it on
  torch.mm's path; ``gemm.py`` picks the library): no scaled tokens × out temporaries, no second pass over it;
* dropout on CPU is a seed, not a mask (``dropout.py``): a compiled kernel applies the mask while drawing it, the
  backward rebuilds it the same way for the input gradient, and nothing mask-sized is saved. The nodes save x⊙mask
  in place of x (A's gradient needs the one, nothing needs the other), so dropout costs no memory; where x is a
  view of another op's output, which that op keeps anyway, they save x and rebuild x⊙mask instead. The seed comes
  from torch's RNG, so ``torch.manual_seed`` and gradient checkpointing's RNG replay reproduce the masks, and the
  1/(1-p) of inverted dropout is folded into the scalar s;
* sibling modules that read the same input tensor (q/k/v, gate/up) share one draw: each module still sees exactly
  inverted dropout with rate p, as the marginal of its own term;
* the backward computes only what is needed, bracketed so every LoRA intermediate is tokens × r, and never the
  frozen weight's gradient.

The math is the reference's (tests/ops/test_linear.py checks values and gradients against it);
``settings.override(fused=False)`` or ``LORATUNE_FUSED=0`` forces the reference path everywhere (and the modules' own
forwards for the fused blocks of ``blocks.py``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from .. import settings
from . import dropout as seeded
from . import gemm, traced

_state = threading.local()


_HALF = (torch.float16, torch.bfloat16)


def is_enabled() -> bool:
    """Whether the fused fast path is on here (``LORATUNE_FUSED``, or ``settings.override(fused=...)``)."""
    return settings.get().fused


@dataclass(frozen=True)
class Plan:
    """How one LoRA linear runs its product: ``path`` "fused" (``lora_linear``) or "reference" (autograd over the
    plain ops), ``reason`` why (for "reference": what rules the fused path out), and on the fused path which library
    runs the matrix products (``matmul``: "oneDNN" or "torch.mm") and how dropout is drawn (``dropout``)."""

    path: str
    reason: str
    matmul: str = ""
    dropout: str = ""


def unfused_reason(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dropout: float
                   ) -> str | None:
    """Why ``lora_linear`` cannot take this product (None: it can). It covers a frozen ``weight``, x in the weight's
    dtype on its device, adapters of one dtype (the weight's, or fp32 on a half-precision weight), no autocast."""
    if not is_enabled():
        return "the fused path is off (LORATUNE_FUSED=0 or settings.override(fused=False))"
    if weight.requires_grad:
        return "the base weight trains"
    if x.dtype != weight.dtype:
        return f"the input is {x.dtype} but the base weight {weight.dtype}"
    if B.dtype != A.dtype or not (A.dtype == weight.dtype or (A.dtype == torch.float32 and weight.dtype in _HALF)):
        return f"adapters of {A.dtype}/{B.dtype} on a {weight.dtype} base"
    if not 0 <= dropout < 1:
        return f"dropout {dropout} is outside [0, 1)"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on"
    if x.device != weight.device or x.dim() < 1:
        return "the input is not a tensor on the weight's device"
    return None


def plan(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dropout: float, training: bool
         ) -> Plan:
    """Which path ``LoraLinear``'s product takes on input ``x``, and why (see ``Plan``)."""
    reason = unfused_reason(x, weight, A, B, dropout)
    if reason is not None:
        return Plan("reference", reason)
    x2 = x.reshape(-1, x.shape[-1])
    matmul = "oneDNN" if gemm.routed(x2, weight) else "torch.mm"
    if not (training and dropout > 0):
        drawn = "none"
    elif _seeded_masks(x.device):
        drawn = "seeded, compiled kernel" if seeded.kernel() is not None else "seeded, numpy"
    else:
        drawn = "bool mask"
    return Plan("fused", "one active unmerged adapter on a frozen base", matmul, drawn)


# --- dropout draws -----------------------------------------------------------------------------------------------
class Draw:
    """One dropout draw on one input tensor, shared by the modules that read it (q/k/v, gate/up).

    On CPU a draw is a seed (``dropout.py``): the mask is a pure function of the seed and the element index, the
    kernel applies it while drawing it, and the backward rebuilds it, so no mask is ever saved. Elsewhere it is a
    bool drop mask from torch's bernoulli, which the modules' nodes save and apply with one ``where`` each.
    """

    __slots__ = ("p", "seed", "drop", "__weakref__")

    def __init__(self, shape: torch.Size, p: float, device: torch.device):
        self.p = p
        self.seed = seeded.new_seed() if _seeded_masks(device) else None
        self.drop = None if self.seed is not None else torch.empty(shape, dtype=torch.bool, device=device
                                                                   ).bernoulli_(p)

    def keep(self, shape: torch.Size) -> torch.Tensor:
        """The keep mask (bool) of an input of this shape; for checking against a reference."""
        return seeded.keep_mask(shape, self.seed, self.p) if self.seed is not None else ~self.drop.view(shape)

    def apply(self, src: torch.Tensor, out: torch.Tensor | None = None, drop: torch.Tensor | None = None
              ) -> torch.Tensor:
        """out = src ⊙ keep (``out`` may be ``src``; None: a new tensor); ``drop``: the saved drop mask, off CPU."""
        if self.seed is not None:
            return seeded.apply_mask(src, self.seed, self.p, out=out)
        drop = (self.drop if drop is None else drop).view(src.shape)
        if out is src:
            return src.masked_fill_(drop, 0)
        return torch.where(drop, 0, src) if out is None else torch.where(drop, 0, src, out=out)


def _seeded_masks(device: torch.device) -> bool:
    """Whether draws on ``device`` are seeds (CPU: the kernel rebuilds masks) or stored bool masks."""
    return device.type == "cpu"


def new_draw(shape: torch.Size, p: float, device: torch.device) -> Draw:
    return Draw(shape, p, device)


def _lora_input(entry: dict, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x2 ⊙ keep (x2 itself without dropout) in the adapters' ``dtype``, computed once and shared by the siblings
    that read the same input.

    The siblings' forward calls come one after another, so the first computes it and the others find it in the
    per-thread input cache (``_shared_input``), which holds it only until the next input. The nodes save this tensor
    instead of x (except for views, see LoraLinearFunction.forward): A's gradient needs it, and nothing in the
    backward needs x itself, so the backward does not rebuild it. On a half-precision base with fp32 adapters this
    is the one upcast copy of x for all the siblings' forward; with dropout the nodes save it, without they save x
    itself and the backward casts it again (LoraLinearFunction.forward)."""
    xd = entry.get("xd")
    if xd is None or xd.shape != x2.shape or xd.dtype != dtype:
        draw = entry["draw"]
        if x2.dtype == dtype:
            xd = draw.apply(x2)  # (an entry with neither dropout nor a cast is never made)
        else:
            xd = x2.to(dtype, memory_format=torch.contiguous_format)
            if draw is not None:
                draw.apply(xd, out=xd)
        entry["xd"] = xd
    return xd


def _shared_input(x: torch.Tensor, p: float, consumer: object) -> dict:
    """The cache entry for the module ``consumer`` reading ``x``: its dropout draw (None without dropout) and, once
    made, the dropped (and cast) input (``_lora_input``).

    Siblings (q/k/v, gate/up) receive the identical tensor object, so the first one draws and the others reuse the
    draw. The same module calling twice on the same tensor gets a new draw (dropout must not repeat itself), and an
    in-place change of x (its version counter) invalidates the entry. With gradient checkpointing the recomputed
    forward makes the same calls in the same order from the same RNG state, so it makes the same draws.
    """
    c = getattr(_state, "mask_cache", None)
    key = (x._version, p, x.shape, x.dtype)
    if c is not None and c["x"]() is x and c["key"] == key and id(consumer) not in c["consumers"]:
        c["consumers"].add(id(consumer))
        return c
    clear_mask_cache()
    draw = new_draw(x.shape, p, x.device) if p > 0 else None
    dref = None if draw is None else weakref.ref(draw)
    entry = {"key": key, "draw": draw, "consumers": {id(consumer)}}

    def let_go(_, dref=dref):  # x died: no sibling can come for the entry; what the nodes saved is left to them
        entry.pop("xd", None)
        entry["draw"] = None
        d = None if dref is None else dref()
        if d is not None:
            d.drop = None

    entry["x"] = weakref.ref(x, let_go)
    _state.mask_cache = entry
    return entry


def holds_input() -> bool:
    """Whether the sibling cache holds an input's dropout draw or x⊙mask now (``clear_mask_cache`` empties it)."""
    return getattr(_state, "mask_cache", None) is not None


def clear_mask_cache() -> None:
    """Forget the current input's dropout draw and its x⊙mask (what the nodes saved is theirs: with checkpointing,
    which drops saved tensors, this really frees them). ``train()`` calls it when training ends."""
    c = getattr(_state, "mask_cache", None)
    if c is not None and c["draw"] is not None:
        c["draw"].drop = None
    _state.mask_cache = None


# --- the fused LoRA linear ---------------------------------------------------------------------------------------
def _no_grad_forward(x2, xd, weight, bias, A, B, s):
    """``gemm.lora_forward``'s output where no backward can come: the base product first, then the thin LoRA term
    added into it in place (``addmm_``). Without a backward the order is free, and on torch.mm the two orders measure
    differently on the AVX2 VM (exploratory, interleaved): no-grad forwards of the all-linear model took 0.980, 0.991
    and 0.988× as long this way (30-60 forwards each), and training steps 1.019 and 1.020× as long (16 steps each),
    so each path keeps its faster order. On a half-precision base the LoRA term is fp32 and is rounded once, into
    the output, by ``gemm.lora_forward``."""
    if xd.dtype != x2.dtype:
        return gemm.lora_forward(x2, xd, weight, bias, A, B, s)[0]
    us = gemm.linear(xd, A, scale=s)
    return gemm.linear(us, B, other=gemm.linear(x2, weight, bias))


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x⊙m)·Aᵀ·Bᵀ for 2-D x, W frozen, m a dropout draw or None. ``s`` includes 1/(1-p).

    x, W, b share one dtype, and so do A, B; the adapters' may be fp32 on a half-precision base. ``xd`` is x⊙m in
    the adapters' dtype (``_lora_input``; x itself where that is the same), computed outside, without autograd."""

    @staticmethod
    def forward(ctx, x2, xd, weight, bias, A, B, s, draw, save_x):
        out, us = gemm.lora_forward(x2, xd, weight, bias, A, B, s)
        # Saved: x⊙m (x without dropout; the siblings save the same tensor), us (tokens × r) and the parameters; a
        # mask only off CPU. Nothing tokens × out. x⊙m rather than x, because A's gradient needs it and nothing
        # needs x, except where x is a view (``save_x``; see lora_linear): then x's storage is another op's output,
        # which that op usually saves anyway (attention's output before o_proj), so x costs nothing to keep and the
        # backward rebuilds x⊙m from it.
        # Without dropout, a cast xd (half base, fp32 adapters) is not kept either: x is, as the input itself,
        # usually kept by another op anyway, and the backward casts it again, one op for half the memory.
        rebuild = (save_x or draw is None) and xd is not x2
        ctx.save_for_backward(x2 if rebuild else xd, weight, A, B, us, None if draw is None else draw.drop)
        ctx.s, ctx.has_bias, ctx.draw, ctx.rebuild = s, bias is not None, draw, rebuild
        return out

    @staticmethod
    def backward(ctx, g):
        xd, weight, A, B, us, drop = ctx.saved_tensors
        s, draw = ctx.s, ctx.draw
        g = g.contiguous()
        ga = g.to(A.dtype)  # the LoRA products in the adapters' precision (a no-op unless the base is half)
        need_x, _, _, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        grad_x = grad_bias = grad_A = grad_B = None
        gu = gemm.linear(ga, B.t(), scale=s) if (need_x or need_A) else None  # tokens × r: ∂L/∂(xd·Aᵀ)
        if need_x:  # tokens × in through the rank-r bottleneck, not an out × in matrix
            lora_gx = gemm.linear(gu, A.t())
            if draw is not None:
                draw.apply(lora_gx, lora_gx, drop)  # in place: no second tokens × in buffer
            grad_x = gemm.linear(g, weight.t(), other=lora_gx.to(g.dtype))  # + g·W, as it is written
        if need_A:
            if ctx.rebuild:  # saved x: x⊙m again (the same bits from the draw's seed, or its saved mask), cast
                if xd.dtype == A.dtype:
                    xd = draw.apply(xd, drop=drop)  # one pass into a new tensor
                else:
                    xd = xd.to(A.dtype, memory_format=torch.contiguous_format)
                    if draw is not None:
                        draw.apply(xd, xd, drop)
            grad_A = gemm.linear(gu.t(), xd.t())  # guᵀ·xd: on MKL the orientation of a thin product moves its time
        if need_B:
            grad_B = ga.t().mm(us)
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        return grad_x, None, None, grad_bias, grad_A, grad_B, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, dropout: float, training: bool, consumer: object = None
                ) -> torch.Tensor:
    """F.linear(x, weight, bias) + lora_linear_reference(x, A, B, scaling, dropout, training), fast.

    ``weight`` is (out, in) and frozen. ``consumer`` identifies the calling module, for sharing dropout draws.
    """
    if torch.compiler.is_compiling():  # Dynamo cannot trace the draws and the sibling cache: the custom ops can
        return traced.lora_linear(x, weight, bias, A, B, scaling, dropout, training)
    p = dropout if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    draw, xd = None, x2
    if p > 0 or x.dtype != A.dtype:
        with torch.no_grad():  # keyed on x itself: siblings receive the same x object, never the same view
            entry = _shared_input(x, p, consumer)
            draw, xd = entry["draw"], _lora_input(entry, x2, A.dtype)
    s = scaling / (1 - p)  # inverted dropout's rescale, folded into the scalar
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out = LoraLinearFunction.apply(x2, xd, weight, bias, A, B, s, draw, x._base is not None)
    else:  # nothing here needs a gradient: the plain forward
        out = _no_grad_forward(x2, xd, weight, bias, A, B, s)
    return out.view(*x.shape[:-1], out.shape[-1])
