"""The fused LoRA linear's custom ops (ops/traced.py), the form it takes inside torch.compile: values and gradients
against a float64 reference with the same mask, the same results compiled (fullgraph: no graph break) as eager, and
dropout drawn inside a compiled graph at the right rate, anew on every call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loratune.adapters import functional as LF
from loratune.ops import dropout as seeded
from loratune.ops import linear as fused
from loratune.ops import traced

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("gemm_route")  # on oneDNN and again on torch.mm, as the eager tests


def _tensors(dtype=torch.float32, n_in=24, n_out=20, r=4, lead=(3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = mk(*lead, n_in).requires_grad_()
    W, b = mk(n_out, n_in), mk(n_out).requires_grad_()
    A, B = mk(r, n_in).requires_grad_(), mk(n_out, r).requires_grad_()
    return x, W, b, A, B


def _reference(x, W, b, A, B, s, keep=None, p=0.0):
    """In float64, with the keep mask ``keep`` (bool, x's shape) and inverted dropout's 1/(1-p)."""
    x, W, b, A, B = (t.double() for t in (x, W, b, A, B))
    xd = x if keep is None else x * keep / (1 - p)
    return F.linear(x, W, b) + LF.lora_linear_reference(xd, A, B, s)


def _traced_linear(x, W, b, A, B, s, seed, p):
    """traced.lora_linear's body with a given seed (it draws its own), for comparing masks."""
    x2 = x.reshape(-1, x.shape[-1])
    xd = traced.dropout_from_seed(x2, seed, p) if p else x2
    out, _ = traced.lora_linear_op(x2, xd, W, b, A, B, s / (1 - p))
    return out.view(*x.shape[:-1], -1)


def _grads(out, inputs, seed=1):
    """The gradients of ⟨out, g⟩ for one random g (drawn in float32 whatever out's dtype, so that a float64
    reference gets the same g)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_custom_ops_match_the_float64_reference(p):
    x, W, b, A, B = _tensors()
    seed = torch.tensor(12345, dtype=torch.int64)
    out = _traced_linear(x, W, b, A, B, 1.7, seed, p)
    keep = seeded.keep_mask(x.shape, 12345, p) if p else None
    ref = _reference(x, W, b, A, B, 1.7, keep, p)
    assert rel_err(out, ref) < 1e-5
    for got, want in zip(_grads(out, [x, b, A, B]), _grads(ref, [x, b, A, B])):
        assert rel_err(got, want) < 1e-5


def test_seeded_dropout_op_is_the_kernels_mask_and_its_own_adjoint():
    x = torch.randn(5, 33, requires_grad=True)
    seed = torch.tensor(7, dtype=torch.int64)
    y = traced.dropout_from_seed(x, seed, 0.4)
    keep = seeded.keep_mask(x.shape, 7, 0.4)
    assert torch.equal(y, x.detach() * keep)  # exactly: no rescale here, the callers fold it into the scalar
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g * keep)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_custom_ops_equal_eager_with_the_same_seed(p):
    x, W, b, A, B = _tensors()
    seed = torch.tensor(99, dtype=torch.int64)
    torch._dynamo.reset()
    compiled = torch.compile(_traced_linear, backend="inductor", fullgraph=True)  # fullgraph: a break raises
    got, want = compiled(x, W, b, A, B, 0.5, seed, p), _traced_linear(x, W, b, A, B, 0.5, seed, p)
    assert rel_err(got, want) < 1e-6
    for g1, g2 in zip(_grads(got, [x, b, A, B]), _grads(want, [x, b, A, B])):
        assert rel_err(g1, g2) < 1e-6


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_linear_traces_whole_and_matches_the_eager_fused_path(p):
    """fused.lora_linear itself under torch.compile(fullgraph=True): it takes the custom ops, draws a new mask per
    call, and at p = 0 equals the eager fused path (at p > 0 the masks are new draws: checked by their rate)."""
    x, W, b, A, B = _tensors(lead=(64, 32))
    torch._dynamo.reset()
    compiled = torch.compile(fused.lora_linear, backend="inductor", fullgraph=True)
    out = compiled(x, W, b, A, B, 0.5, p, True)
    eager = fused.lora_linear(x, W, b, A, B, 0.5, p, True)
    if p == 0:
        assert rel_err(out, eager) < 1e-6
        for g1, g2 in zip(_grads(out, [x, b, A, B]), _grads(eager, [x, b, A, B])):
            assert rel_err(g1, g2) < 1e-6
        return
    # B's gradient is gᵀ·(s·xd·Aᵀ): with g = 1 and A = I on the first columns, it exposes xd's column sums...
    # simpler and exact: the LoRA term alone, with W = 0 and b = 0, is s·xd·Aᵀ·Bᵀ; A = B = I (r = n_in = n_out)
    n = x.shape[-1]
    eye = torch.eye(n)
    terms = [compiled(x.detach(), torch.zeros(n, n), None, eye, eye, 1.0, p, True) for _ in range(2)]
    for term in terms:  # each element is x / (1 - p) or 0
        kept = term != 0
        assert torch.allclose(term[kept], (x.detach() / (1 - p))[kept], rtol=1e-6)
        assert abs(kept.float().mean().item() - (1 - p)) < 0.01  # 64·32·24 draws: σ ≈ 0.0045
    assert not torch.equal(terms[0] != 0, terms[1] != 0)  # a new seed on every call of the compiled graph


def test_half_base_with_fp32_adapters_matches_the_eager_fused_path():
    x, W, b, A, B = _tensors()
    xh, Wh, bh = (t.detach().to(torch.bfloat16) for t in (x, W, b))
    xh.requires_grad_()
    seed = torch.tensor(5, dtype=torch.int64)
    x2 = xh.reshape(-1, xh.shape[-1])
    xd = traced.dropout_from_seed(x2.to(torch.float32), seed, 0.2)
    out, _ = traced.lora_linear_op(x2, xd, Wh, bh, A, B, 1.5 / 0.8)
    keep = seeded.keep_mask(x2.shape, 5, 0.2)
    ref = _reference(x2, Wh, bh, A, B, 1.5, keep, 0.2)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    for got, want in zip(_grads(out, [xh, A, B]), _grads(ref, [xh, A, B])):
        assert rel_err(got, want) < 2e-2


def test_the_ops_pass_opcheck():
    """Schema, fake-tensor, autograd-registration and AOT-dispatch checks of torch.library."""
    x, W, b, A, B = _tensors(lead=(6,))
    seed = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(torch.ops.loratune.dropout_from_seed.default, (x, seed, 0.3))
    xd = x.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.loratune.lora_linear.default, (x, xd, W, b, A, B, 0.7))
    torch.library.opcheck(torch.ops.loratune.lora_linear.default, (x, x, W, None, A, B, 0.7))
    g, us = torch.randn(6, 20), torch.randn(6, 4)
    x, A, B = x.detach(), A.detach(), B.detach()  # (the backward has no backward of its own)
    for needs in ([True] * 4, [False, True, False, True]):
        torch.library.opcheck(torch.ops.loratune.lora_linear_backward.default, (g, x, W, A, B, us, 0.7, needs))
