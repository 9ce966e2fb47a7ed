"""A fast LoRA linear for training: y = x·W0ᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ in one autograd node.

Why not just autograd over ``lora_linear_reference``? With a frozen base, the work a LoRA step must do is the base
forward, the input-gradient half of the base backward and six thin (tokens × r) matmuls per module. The reference
path adds, per module, a float dropout mask and a dropped-out copy of x (both saved), a scaling multiply and an add
over the full output, and as many autograd nodes; on CPU the dropout's random numbers alone cost about half a base
matmul. Here:

* the thin LoRA product is written first and the base matmul accumulates into it (``addmm_``): no tokens × out
  temporaries and no second pass over the output;
* the dropout mask is a bool tensor saved with x itself (1 byte per element instead of a float mask plus a float
  copy of x), drawn from a fast bit generator seeded from torch's RNG (so ``torch.manual_seed`` and gradient
  checkpointing's RNG replay reproduce it), and the 1/(1-p) of inverted dropout is folded into the scalar s;
* sibling modules that read the same input tensor (q/k/v, gate/up) share one mask: each module still sees exactly
  inverted dropout with rate p, as the marginal of its own term;
* the backward computes only what is needed, bracketed so every LoRA intermediate is tokens × r, and never the
  frozen weight's gradient.

The math is the reference's (tests/test_fused.py checks values and gradients against it); ``enabled(False)`` or
``LORATUNE_FUSED=0`` forces the reference path everywhere.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

import numpy as np
import torch

_state = threading.local()
_ENABLED = os.environ.get("LORATUNE_FUSED", "1") != "0"


def is_enabled() -> bool:
    return getattr(_state, "enabled", _ENABLED)


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Turn the fast path on or off (this thread) inside the block, e.g. ``with fused.enabled(False):``."""
    before = is_enabled()
    _state.enabled = bool(flag)
    try:
        yield
    finally:
        _state.enabled = before


# --- dropout masks -----------------------------------------------------------------------------------------------
def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True with probability 1 - p, drawn from torch's RNG state (reproducible, checkpoint-safe).

    On CPU torch's bernoulli costs ~6 ns per element. Instead one 64-bit seed is taken from torch's generator and
    SFC64 supplies one random byte r per element (~0.4 ns): with p·256 = t + f (t whole, 0 ≤ f < 1), drop iff r < t,
    or r == t and a further 32-bit draw falls below f·2³² (1 element in 256 needs it). P(drop) = (t + f)/256 = p,
    exact to 2⁻⁴⁰. (Drawing in pieces on a second thread was tried: in a training step it was slower.)
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p)
    n = shape.numel()
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    gen = np.random.SFC64(seed)
    r = gen.random_raw((n + 7) // 8).view(np.uint8)[:n]  # eight random bytes per 64-bit draw
    t, f = divmod(p * 256, 1)
    t = np.uint8(t)  # an int, not a float: comparing bytes with a float would convert them all to float64
    keep = r > t
    edge = np.flatnonzero(r == t)  # the byte alone cannot decide these
    if len(edge):
        keep[edge] = (gen.random_raw(len(edge)) >> np.uint64(32)) >= round(f * 2**32)
    return torch.from_numpy(keep).view(shape)


def _as_float(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """keep as 0/1 values of ``dtype``. float × bool runs an unvectorized type-promotion loop (~20× a float multiply
    on CPU); going through uint8 -> float, both vectorized, costs about one extra pass."""
    return keep.view(torch.uint8).to(dtype)


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """t ⊙ keep."""
    return t if keep is None else t * _as_float(keep, t.dtype)


class _Dropped:
    """One dropout draw on one input tensor x, shared by the modules that read x (q/k/v, gate/up).

    Forward: the first module draws the mask and computes x⊙mask; the siblings reuse both. Both are held here only
    until the next input replaces this draw (or x dies): the modules' nodes save x and the bool mask, not x⊙mask,
    so the forward allocates no tokens × in tensor that lives until the backward.
    Backward: the siblings' backward passes come one after another; the first rebuilds the float mask and x⊙mask
    (as temporaries, in memory the allocator has just had back), the others reuse them, the last drops them.
    """

    __slots__ = ("mask", "xd", "pending", "fm", "bxd", "__weakref__")

    def __init__(self, mask: torch.Tensor, xd: torch.Tensor):
        self.mask, self.xd = mask, xd
        self.pending = 0  # modules whose backward still needs fm / bxd
        self.fm = self.bxd = None

    def backward_operands(self, x2: torch.Tensor, mask: torch.Tensor, need_xd: bool):
        """(float mask, x⊙mask or None) for one module's backward; ``mask`` is the saved (maybe recomputed) one."""
        if self.fm is None:
            self.fm = _as_float(mask, x2.dtype)
        if need_xd and self.bxd is None:
            self.bxd = x2 * self.fm
        return self.fm, self.bxd if need_xd else None

    def release(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.fm = self.bxd = None


def _shared_dropout(x: torch.Tensor, x2: torch.Tensor, p: float, consumer: object) -> _Dropped:
    """The dropout draw for the module ``consumer`` reading ``x`` (x2: x as tokens × in).

    Siblings (q/k/v, gate/up) receive the identical tensor object, so the first one draws the mask and the others
    reuse it. The same module calling twice on the same tensor gets a new mask (dropout must not repeat itself),
    and an in-place change of x (its version counter) invalidates the entry. The mask is held until the next entry
    replaces it (so siblings agree even where nothing saves it, e.g. reentrant checkpointing's no-grad pass).
    With gradient checkpointing the recomputed forward makes the same calls in the same order from the same RNG
    state, so it rebuilds the same masks.
    """
    c = getattr(_state, "mask_cache", None)
    key = (x._version, p, x.shape, x.dtype)
    if c is not None and c["x"]() is x and c["key"] == key and id(consumer) not in c["consumers"]:
        c["consumers"].add(id(consumer))
        return c["drop"]
    clear_mask_cache()  # the previous input's siblings are done: its x⊙mask can go now
    mask = dropout_keep_mask(x2.shape, p, x.device)
    d = _Dropped(mask, _masked(x2, mask))
    dref = weakref.ref(d)

    def let_go(_, dref=dref):  # x died: no sibling can come for the draw any more
        d = dref()
        if d is not None:
            d.xd = d.mask = None

    _state.mask_cache = {"x": weakref.ref(x, let_go), "key": key, "drop": d, "consumers": {id(consumer)}}
    return d


def clear_mask_cache() -> None:
    """Forget the current input's dropout draw: x⊙mask is freed, and the mask is left to the nodes that saved it
    (so that checkpointing, which drops saved tensors, really frees it)."""
    c = getattr(_state, "mask_cache", None)
    if c is not None:
        c["drop"].xd = c["drop"].mask = None
    _state.mask_cache = None


# --- the fused LoRA linear ---------------------------------------------------------------------------------------
def _forward(x2, xd, weight, bias, A, B, s):
    """Base output plus the LoRA term; returns (out, u) where u = xd·Aᵀ is tokens × r.

    The thin LoRA product is computed first and the base matmul then accumulates into it (beta = 1): the output is
    written by the thin matmul and finished inside the big one's stores, instead of a second full pass over it."""
    u = xd.mm(A.t())
    Bs = B * s  # scale the (out × r) factor, not the tokens × out product
    out = torch.mm(u, Bs.t()) if bias is None else torch.addmm(bias, u, Bs.t())
    return out.addmm_(x2, weight.t()), u


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x⊙m)·Aᵀ·Bᵀ for 2-D x, W frozen, m a bool mask or None. ``s`` includes dropout's 1/(1-p).

    ``drop`` (a ``_Dropped``, with dropout) lends this call x⊙m in the forward and shares the backward's float
    mask and x⊙m with the siblings."""

    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, s, drop):
        xd = x2 if drop is None else drop.xd
        out, u = _forward(x2, xd, weight, bias, A, B, s)
        # Saved: x (the siblings save the same tensor), the bool mask, u (tokens × r) and parameters. Nothing
        # tokens × out, and no x⊙m: the backward rebuilds it once for all siblings.
        ctx.save_for_backward(x2, weight, A, B, u, None if drop is None else drop.mask)
        ctx.s, ctx.has_bias, ctx.drop = s, bias is not None, drop
        if drop is not None:
            drop.pending += 1
        return out

    @staticmethod
    def backward(ctx, g):
        x2, weight, A, B, u, mask = ctx.saved_tensors
        s, drop = ctx.s, ctx.drop
        g = g.contiguous()
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        grad_x = grad_bias = grad_A = grad_B = None
        fm, xd = (None, x2) if drop is None else drop.backward_operands(x2, mask, need_A)
        gu = g.mm(B).mul_(s) if (need_x or need_A) else None  # tokens × r: ∂L/∂u
        if need_x:
            lora_gx = gu.mm(A)  # tokens × in through the rank-r bottleneck, not an out × in matrix
            if fm is not None:
                lora_gx.mul_(fm)  # in place: no second tokens × in buffer
            grad_x = lora_gx.addmm_(g, weight)  # + g·W: the base's input gradient, accumulated in place
        if need_A:
            grad_A = gu.t().mm(xd)
        if need_B:
            grad_B = g.t().mm(u).mul_(s)
        if need_b and ctx.has_bias:
            grad_bias = g.sum(0)
        if drop is not None:
            drop.release()
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, dropout: float, training: bool, consumer: object = None
                ) -> torch.Tensor:
    """F.linear(x, weight, bias) + lora_linear_reference(x, A, B, scaling, dropout, training), fast.

    ``weight`` is (out, in) and frozen. ``consumer`` identifies the calling module, for sharing dropout masks.
    """
    p = dropout if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    drop = None
    if p > 0:
        with torch.no_grad():  # keyed on x itself: siblings receive the same x object, never the same view
            drop = _shared_dropout(x, x2, p, consumer)
    s = scaling / (1 - p)  # inverted dropout's rescale, folded into the scalar
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out = LoraLinearFunction.apply(x2, weight, bias, A, B, s, drop)
    else:
        out = _forward(x2, x2 if drop is None else drop.xd, weight, bias, A, B, s)[0]
    return out.view(*x.shape[:-1], out.shape[-1])
