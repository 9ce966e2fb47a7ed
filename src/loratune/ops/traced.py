"""The fused LoRA linear as torch custom ops, the form ``lora_linear`` takes inside ``torch.compile``.

The eager path (``linear.py``) cannot be traced: its dropout draw is a Python int (``.item()`` on torch's RNG), its
sibling cache is per-thread state keyed on weak references, and its autograd.Function receives x twice when there is
no dropout (Dynamo refuses duplicate inputs). Each was a graph break in every LoRA linear. Here the same arithmetic is
three custom ops with fake (shape-only) implementations and autograd formulas, so Dynamo records one node per op
and inductor compiles what lies between them:

* ``loratune::dropout_from_seed(x, seed, p)``: x ⊙ keep(seed) into a new tensor (``dropout.py``'s mask, the same bits
  for the same seed). The seed is a 0-d int64 tensor drawn in the graph (``torch.randint``), so every step draws a
  new one without leaving the graph; its backward is the same op on the gradient (the mask is its own adjoint) and
  saves nothing mask-sized;
* ``loratune::lora_linear(x2, xd, W, b, A, B, s) -> (out, us)``: ``gemm.lora_forward``, the base product with the
  LoRA term added as it is written;
* ``loratune::lora_linear_backward``: the gradients of x (through the base), of x⊙m (through the rank-r
  bottleneck), of A and of B, bracketed as ``LoraLinearFunction.backward`` does, never the frozen weight's.

Autograd joins the two input gradients (x's and x⊙m's through the dropout op), one tokens × in add that the eager
node folds into the base product. What differs from eager: each module draws its own mask, where eager siblings
(q/k/v, gate/up) share one draw of their common input; each module's dropout is still exactly inverted dropout
with rate p, but the masks (and so the losses at dropout > 0) are not eager's. Off CPU the mask is a plain
``rand_like`` comparison that inductor fuses.
"""

from __future__ import annotations

import torch

from . import blocks, gemm
from . import dropout as seeded

_EMPTY = (0,)


def load_kernels() -> None:
    """Build or load the C kernels now, before anything is traced: their first ``get()`` takes a lock (and may run
    the compiler), which Dynamo cannot trace; once loaded, the fused paths read a plain attribute."""
    seeded.kernel()
    blocks.LIBRARY.get()


# --- seeded dropout ----------------------------------------------------------------------------------------------
@torch.library.custom_op("loratune::dropout_from_seed", mutates_args=())
def dropout_from_seed(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """x ⊙ keep for the mask of ``seed`` (a 0-d int64 tensor) and rate ``p``, into a new contiguous tensor."""
    return seeded.apply_mask(x, int(seed.item()), p)  # (.item() runs here, at run time: the op is opaque to Dynamo)


@dropout_from_seed.register_fake
def _(x, seed, p):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup(ctx, inputs, output) -> None:
    _, seed, p = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _dropout_backward(ctx, g):
    (seed,) = ctx.saved_tensors
    return dropout_from_seed(g, seed, ctx.p), None, None


dropout_from_seed.register_autograd(_dropout_backward, setup_context=_dropout_setup)


def new_seed() -> torch.Tensor:
    """A 62-bit seed as a 0-d int64 tensor from torch's default generator (the draw ``dropout.new_seed`` makes,
    kept as a tensor so that a compiled graph draws a new one on every call)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


# --- the fused LoRA linear ---------------------------------------------------------------------------------------
@torch.library.custom_op("loratune::lora_linear", mutates_args=())
def lora_linear_op(x2: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   A: torch.Tensor, B: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x2·Wᵀ + b + s·xd·Aᵀ·Bᵀ, s·xd·Aᵀ) for 2-D x2 and xd (x2 ⊙ mask in the adapters' dtype)."""
    return gemm.lora_forward(x2, xd, weight, bias, A, B, s)


@lora_linear_op.register_fake
def _(x2, xd, weight, bias, A, B, s):
    return x2.new_empty(x2.shape[0], weight.shape[0]), xd.new_empty(xd.shape[0], A.shape[0])


@torch.library.custom_op("loratune::lora_linear_backward", mutates_args=())
def lora_linear_backward(g: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         us: torch.Tensor, s: float, needs: list[bool]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂L/∂x2 through W, ∂L/∂xd through A, ∂L/∂A, ∂L/∂B); ``needs`` says which (the others are empty tensors).

    The same products as ``LoraLinearFunction.backward``: gu = s·g·B is tokens × r, and the LoRA half of the input
    gradient goes through it, never through an out × in matrix."""
    need_x, need_xd, need_A, need_B = needs
    g = g.contiguous()
    ga = g.to(A.dtype)  # the LoRA products in the adapters' precision (a no-op unless the base is half)
    gu = gemm.linear(ga, B.t(), scale=s) if (need_xd or need_A) else None
    grad_x = gemm.linear(g, weight.t()) if need_x else g.new_empty(_EMPTY)  # (outputs must not alias each other)
    grad_xd = gemm.linear(gu, A.t()) if need_xd else A.new_empty(_EMPTY)
    grad_A = gemm.linear(gu.t(), xd.t()) if need_A else A.new_empty(_EMPTY)  # guᵀ·xd, as the eager node orients it
    grad_B = ga.t().mm(us) if need_B else A.new_empty(_EMPTY)
    return grad_x, grad_xd, grad_A, grad_B


@lora_linear_backward.register_fake
def _(g, xd, weight, A, B, us, s, needs):
    need_x, need_xd, need_A, need_B = needs
    adapters = A.dtype

    def made(flag, *shape, dtype):
        return g.new_empty(shape if flag else _EMPTY, dtype=dtype)

    return (made(need_x, g.shape[0], weight.shape[1], dtype=g.dtype),
            made(need_xd, g.shape[0], A.shape[1], dtype=adapters), made(need_A, *A.shape, dtype=adapters),
            made(need_B, *B.shape, dtype=adapters))


def _linear_setup(ctx, inputs, output) -> None:
    x2, xd, weight, bias, A, B, s = inputs
    ctx.save_for_backward(xd, weight, A, B, output[1])
    ctx.s, ctx.has_bias = s, bias is not None


def _linear_backward(ctx, g, _gus):
    # us is an output only for the backward's sake: nothing downstream reads it, so its gradient is None or zero
    xd, weight, A, B, us = ctx.saved_tensors
    need_x, need_xd, need_b, need_A, need_B = (ctx.needs_input_grad[i] for i in (0, 1, 3, 4, 5))
    grad_x, grad_xd, grad_A, grad_B = lora_linear_backward(g, xd, weight, A, B, us, ctx.s,
                                                           [need_x, need_xd, need_A, need_B])
    grad_bias = g.sum(0) if need_b and ctx.has_bias else None
    return (grad_x if need_x else None, grad_xd if need_xd else None, None, grad_bias,
            grad_A if need_A else None, grad_B if need_B else None, None)


lora_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, dropout: float, training: bool) -> torch.Tensor:
    """``linear.lora_linear`` for a traced region: the same product through the custom ops above."""
    p = dropout if training else 0.0
    x2 = x.reshape(-1, x.shape[-1])
    xd = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
    if p > 0:
        if x.device.type == "cpu":
            xd = dropout_from_seed(xd, new_seed(), p)
        else:  # as eager off CPU: a bool mask from torch's generator (inductor fuses the draw and the product)
            xd = torch.where(torch.rand_like(xd) < p, 0, xd)
    out, _ = lora_linear_op(x2, xd, weight, bias, A, B, scaling / (1 - p))
    return out.view(*x.shape[:-1], out.shape[-1])
