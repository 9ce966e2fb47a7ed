"""The fused LoRA linear against the plain reference: values, gradients, dropout, sibling masks, fallbacks."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loratune import LoraConfig, get_lora_model, settings
from loratune.adapters import functional as LF
from loratune.adapters.layers import BASE, Conv1DLora, LinearLora
from loratune.ops import dropout as seeded
from loratune.ops import linear as fused

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_gpt2, tiny_llama

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


pytestmark = pytest.mark.usefixtures("gemm_route")  # every test on oneDNN and again on torch.mm


@pytest.fixture(params=["native", "numpy"])
def dropout_impl(request, monkeypatch):
    """Run a test with the compiled dropout kernel and again with the numpy fallback (they draw the same bits)."""
    if request.param == "numpy":
        monkeypatch.setattr(seeded.LIBRARY, "lib", None)
    else:
        assert seeded.kernel() is not None, "the dropout kernel did not build on this machine"
    return request.param


@pytest.fixture
def record_masks(monkeypatch):
    """Every dropout draw the fused path makes, in order, as its keep mask (before the 1/(1-p) rescale)."""
    masks = []
    draw = fused.new_draw

    def recording(shape, p, device):
        d = draw(shape, p, device)
        masks.append(d.keep(shape))
        return d

    monkeypatch.setattr(fused, "new_draw", recording)
    return masks


def _reference(x, W, b, A, B, s, mask=None, p=0.0):
    xd = x if mask is None else x * mask.view(x.shape) / (1 - p)
    return F.linear(x, W, b) + LF.lora_linear_reference(xd, A, B, s)


def _tensors(dtype, n_in=24, n_out=20, r=4, lead=(3, 7)):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = mk(*lead, n_in).requires_grad_()
    W, b = mk(n_out, n_in), mk(n_out).requires_grad_()
    A, B = mk(r, n_in).requires_grad_(), mk(n_out, r).requires_grad_()
    return x, W, b, A, B


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_linear_matches_reference(dtype, p, record_masks, dropout_impl):
    x, W, b, A, B = _tensors(dtype)
    out = fused.lora_linear(x, W, b, A, B, 1.7, p, training=True)
    mask = record_masks[0] if p else None
    assert len(record_masks) == (1 if p else 0)
    ref = _reference(x, W, b, A, B, 1.7, mask, p)
    assert rel_err(out, ref) <= TOL[dtype]
    for got, want in zip(_grads(out, [x, b, A, B]), _grads(ref, [x, b, A, B])):
        assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_half_base_with_fp32_adapters_runs_lora_in_fp32(half, p, record_masks):
    """A bf16/fp16 base with fp32 adapters (the default) on the fast path: the LoRA products run in fp32, as PEFT's
    do, so A's and B's gradients are fp32-exact given the half-precision input and upstream gradient; the output and
    x's gradient are the base's dtype, off the float64 values by that dtype's rounding alone."""
    x, W, b, A, B = _tensors(torch.float32, n_in=64, n_out=48, r=8, lead=(4, 16))
    x, W, b = x.detach().to(half).requires_grad_(), W.to(half), b.detach().to(half).requires_grad_()
    layer = LinearLora(nn.Linear(64, 48).to(half).requires_grad_(False))
    layer.base_layer.weight.data, layer.base_layer.bias.data = W, b.detach()
    layer.add_adapter("a", r=8, lora_alpha=8, dropout=p, use_rslora=False, init=False)
    ad = layer.train().adapters["a"]
    assert ad.lora_A.dtype == torch.float32 and layer.plan(x).path == "fused"
    out = layer(x)
    assert out.dtype == half and len(record_masks) == (1 if p else 0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(half)
    gx, gA, gB = torch.autograd.grad(out, [x, ad.lora_A, ad.lora_B], g)
    assert gx.dtype == half and gA.dtype == gB.dtype == torch.float32
    f64 = [t.detach().double().requires_grad_() for t in (x, ad.lora_A, ad.lora_B)]
    ref = _reference(f64[0], W.double(), b.detach().double(), f64[1], f64[2], ad.scaling,
                     record_masks[0] if p else None, p)
    rx, rA, rB = torch.autograd.grad(ref, f64, g.double())
    eps = torch.finfo(half).eps
    assert rel_err(out, ref) <= eps and rel_err(gx, rx) <= eps
    assert rel_err(gA, rA) <= 1e-5 and rel_err(gB, rB) <= 1e-5
    with settings.override(fused=False):  # the general path (PEFT's arithmetic) is no closer to float64
        slow = layer(x)
    assert rel_err(out, ref) <= 2 * rel_err(slow, ref) + eps / 8


def test_eval_and_no_grad_use_no_dropout_and_match(record_masks):
    x, W, b, A, B = _tensors(torch.float64)
    ref = _reference(x, W, b, A, B, 0.5)
    assert rel_err(fused.lora_linear(x, W, b, A, B, 0.5, 0.3, training=False), ref) < 1e-12
    with torch.no_grad():
        out = fused.lora_linear(x, W, b, A, B, 0.5, 0.0, training=True)
    assert not out.requires_grad and rel_err(out, ref) < 1e-12
    assert record_masks == []


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_no_grad_forward_matches_float64(base_dtype):
    """The no-grad path (base product first, LoRA term added into it; a half base takes the training order) is the
    same function: fp32 within 1e-5 of float64, a half base within its epsilon, bias included."""
    x, W, b, A, B = (t.detach() for t in _tensors(torch.float32, n_in=64, n_out=48, r=8, lead=(5, 9)))
    x, W, b = x.to(base_dtype), W.to(base_dtype), b.to(base_dtype)
    with torch.no_grad():
        out = fused.lora_linear(x, W, b, A, B, 0.75, 0.1, training=False)
    ref = _reference(x.double(), W.double(), b.double(), A.double(), B.double(), 0.75)
    assert out.dtype == base_dtype
    assert rel_err(out, ref) <= (1e-5 if base_dtype == torch.float32 else torch.finfo(base_dtype).eps)


def test_only_needed_gradients_are_computed():
    x, W, b, A, B = _tensors(torch.float32)
    x = x.detach()
    out = fused.lora_linear(x, W, None, A, B, 2.0, 0.0, training=True)
    gA, gB = _grads(out, [A, B])
    ref = _reference(x, W, None, A, B, 2.0)
    rA, rB = _grads(ref, [A, B])
    assert rel_err(gA, rA) <= 1e-5 and rel_err(gB, rB) <= 1e-5


def test_draws_follow_torch_seed_and_differ():
    shape, cpu = torch.Size([64, 64]), torch.device("cpu")
    torch.manual_seed(3)
    a, b = fused.new_draw(shape, 0.5, cpu).keep(shape), fused.new_draw(shape, 0.5, cpu).keep(shape)
    torch.manual_seed(3)
    assert torch.equal(fused.new_draw(shape, 0.5, cpu).keep(shape), a)
    assert not torch.equal(a, b)


def test_dropout_keeps_the_expectation(dropout_impl):
    torch.manual_seed(0)
    x, W, b, A, B = _tensors(torch.float64, lead=(20000,))
    x = x.detach() + 1  # not zero-mean, so that a wrong scale shows in the mean
    noise = fused.lora_linear(x, W, b, A, B, 1.0, 0.5, training=True) - _reference(x, W, b, A, B, 1.0)
    # Inverted dropout is unbiased: each row's noise has mean zero, so the column means are within 5 standard
    # errors of zero (a missing or wrong 1/(1-p) rescale shifts them by tens of standard errors).
    se = noise.std(0) / len(noise) ** 0.5
    assert (noise.mean(0).abs() < 5 * se).all()
    with torch.no_grad():
        biased = fused.lora_linear(x, W, b, A, B, 0.5, 0.5, training=True) - _reference(x, W, b, A, B, 1.0)
    assert (biased.mean(0).abs() > 5 * se).any()  # the check itself can tell a wrong scale


def _sibling_layers(p, dtype=torch.float32):
    torch.manual_seed(0)
    layers = []
    for n_out in (16, 8, 8):
        layer = LinearLora(nn.Linear(24, n_out).to(dtype).requires_grad_(False))
        layer.add_adapter("a", r=4, lora_alpha=8, dropout=p, use_rslora=False, init=False)
        layers.append(layer.train())
    return layers


def test_siblings_share_a_mask_and_repeat_calls_do_not(record_masks):
    q, k, v = _sibling_layers(0.2)
    x = torch.randn(5, 24)
    q(x), k(x), v(x)
    assert len(record_masks) == 1  # one mask for the three modules reading x
    q(x)
    assert len(record_masks) == 2  # the same module again: a fresh mask
    q(x.clone())
    assert len(record_masks) == 3  # another tensor: a fresh mask
    x.mul_(1.0)
    k(x)
    assert len(record_masks) == 4  # x changed in place: a fresh mask


def test_dropout_saves_one_dropped_copy_no_mask_and_not_x(record_masks):
    q, k, v = _sibling_layers(0.2)
    x = torch.randn(6, 24, requires_grad=True)
    h = x * 1  # the layers' input: an intermediate, as in a model
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [layer(h) for layer in (q, k, v)]
    big = [t for t in saved if t.shape == h.shape]
    # h⊙mask, made once and saved by the three siblings in place of h (the backward needs it, not h), and no
    # mask: the backward rebuilds that from the draw's seed
    assert len(big) == 3 and len({t.untyped_storage().data_ptr() for t in big}) == 1
    assert big[0].untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
    assert torch.equal(big[0], h.detach() * record_masks[0])
    assert not [t for t in saved if t.dtype == torch.bool]
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None
    fused.clear_mask_cache()
    assert not fused.holds_input()


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_half_base_siblings_share_one_upcast_and_keep_it_only_with_dropout(p, record_masks):
    """bf16 base, fp32 adapters: q/k/v cast x to fp32 once between them. With dropout the nodes save that one
    fp32 x⊙mask (A's gradient needs it); without, they save x itself (no extra memory) and the backward casts it."""
    layers = [layer.to(torch.bfloat16) for layer in _sibling_layers(p)]
    for layer in layers:
        layer.adapters["a"].float()
    x = torch.randn(6, 24, dtype=torch.bfloat16, requires_grad=True)
    h = x * 1
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [layer(h) for layer in layers]
    big = [t for t in saved if t.shape == h.shape]
    assert len(big) == 3 and len({t.untyped_storage().data_ptr() for t in big}) == 1
    if p:
        assert big[0].dtype == torch.float32 and torch.equal(big[0], h.detach().float() * record_masks[0])
    else:
        assert big[0].dtype == torch.bfloat16 and big[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
    params = [x] + [t for L in layers for t in (L.adapters["a"].lora_A, L.adapters["a"].lora_B)]
    got = torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs])
    ref_in = [t.detach().double().requires_grad_() for t in params]
    mask = record_masks[0] if p else None
    refs = [_reference(ref_in[0], L.weight.double(), L.base_layer.bias.double(), ref_in[1 + 2 * i],
                       ref_in[2 + 2 * i], L.adapters["a"].scaling, mask, p) for i, L in enumerate(layers)]
    want = torch.autograd.grad(refs, ref_in, [torch.ones_like(r) for r in refs])
    assert rel_err(got[0], want[0]) <= torch.finfo(torch.bfloat16).eps
    assert max(rel_err(a, b) for a, b in zip(got[1:], want[1:])) <= 1e-5


@pytest.mark.parametrize("stored_masks", [False, True])
def test_a_view_input_is_saved_as_itself_and_x_dropped_rebuilt(stored_masks, record_masks, monkeypatch):
    """A view's storage is another op's output, which that op usually keeps (attention's output before o_proj):
    saving x⊙mask too would add a tokens × in tensor, so the node saves x and the backward redraws the mask (or,
    off CPU, applies the saved one)."""
    if stored_masks:
        monkeypatch.setattr(fused, "_seeded_masks", lambda device: False)
    p = 0.3
    (q,) = _sibling_layers(p, torch.float64)[:1]
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    out_of_another_op = x * 1
    h = out_of_another_op.view(2, 3, 24)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = q(h)
    big = [t for t in saved if t.numel() == h.numel() and t.dtype != torch.bool]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
    assert len([t for t in saved if t.dtype == torch.bool]) == stored_masks
    (mask,) = record_masks
    ad = q.adapters["a"]
    params = [x, ad.lora_A, ad.lora_B]
    g = torch.randn_like(out)
    ref = _reference(h, q.weight, q.base_layer.bias, ad.lora_A, ad.lora_B, ad.scaling, mask, p)
    assert rel_err(out, ref) <= 1e-12
    got = torch.autograd.grad(out, params, g, retain_graph=True)  # (ref shares the x * 1 node)
    for a, b in zip(got, torch.autograd.grad(ref, params, g)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_view_input_on_a_half_base_is_saved_as_itself_and_rebuilt_in_fp32(p, record_masks):
    """o_proj's case on a bf16 base with fp32 adapters: the node keeps the bf16 view, and the backward casts it (and
    masks it) again for A's gradient, which stays fp32-exact."""
    (q,) = _sibling_layers(p)[:1]
    q = q.to(torch.bfloat16)
    q.adapters["a"].float()
    x = torch.randn(6, 24, dtype=torch.bfloat16, requires_grad=True)
    h = (x * 1).view(2, 3, 24)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = q(h)
    big = [t for t in saved if t.numel() == h.numel() and t.dtype != torch.bool]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16
    assert big[0].untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
    ad = q.adapters["a"]
    g = torch.randn(out.shape).to(torch.bfloat16)
    gA, gB = torch.autograd.grad(out, [ad.lora_A, ad.lora_B], g)
    ref_in = [t.detach().double().requires_grad_() for t in (ad.lora_A, ad.lora_B)]
    ref = _reference(h.detach().double(), q.weight.double(), q.base_layer.bias.double(), *ref_in, ad.scaling,
                     record_masks[0] if p else None, p)
    rA, rB = torch.autograd.grad(ref, ref_in, g.double())
    assert rel_err(gA, rA) <= 1e-5 and rel_err(gB, rB) <= 1e-5


def test_interleaved_draws_each_keep_their_own_dropped_input(record_masks):
    """A module whose input is no longer the current one gets a new draw and its own x⊙mask; the backward, which
    runs the nodes in another order (later nodes first), gets every gradient right: v(x'), q(y), k(x), q(x)."""
    p = 0.3
    q, k, v = _sibling_layers(p, torch.float64)
    x = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    calls = [(q, x), (k, x), (q, y), (v, x)]  # v after y: x is no longer the current input, a new draw
    outs = [layer(t) for layer, t in calls]
    assert len(record_masks) == 3
    masks = [record_masks[i] for i in (0, 0, 1, 2)]
    params = [x, y] + [t for L in (q, k, v) for t in (L.adapters["a"].lora_A, L.adapters["a"].lora_B)]
    gs = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, params, gs)
    refs = [_reference(t, L.weight, L.base_layer.bias, L.adapters["a"].lora_A, L.adapters["a"].lora_B,
                       L.adapters["a"].scaling, m, p) for (L, t), m in zip(calls, masks)]
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= 1e-12
    for a, b in zip(got, torch.autograd.grad(refs, params, gs)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_siblings_match_reference_with_the_same_mask(dtype, record_masks):
    p = 0.25
    layers = _sibling_layers(p, dtype)
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    outs = [layer(x) for layer in layers]
    (mask,) = record_masks
    params = [x] + [t for layer in layers for t in (layer.adapters["a"].lora_A, layer.adapters["a"].lora_B)]
    torch.manual_seed(9)
    got = torch.autograd.grad(sum((o * torch.randn_like(o)).sum() for o in outs), params)
    refs = [_reference(x, layer.weight, layer.base_layer.bias, layer.adapters["a"].lora_A,
                       layer.adapters["a"].lora_B, layer.adapters["a"].scaling, mask, p) for layer in layers]
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= TOL[dtype]
    torch.manual_seed(9)
    want = torch.autograd.grad(sum((o * torch.randn_like(o)).sum() for o in refs), params)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL[dtype]


def test_conv1d_base_uses_fast_path_and_matches():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1DLora(Conv1D(10, 12).requires_grad_(False))
    layer.add_adapter("a", r=4, lora_alpha=8, dropout=0.0, use_rslora=False, init=False)
    x = torch.randn(3, 5, 12, requires_grad=True)
    assert layer.plan(x).path == "fused"
    out = layer(x)
    with settings.override(fused=False):
        ref = layer(x)
    assert rel_err(out, ref) <= 1e-6
    ad = layer.adapters["a"]
    for a, b in zip(_grads(out, [x, ad.lora_A, ad.lora_B]), _grads(ref, [x, ad.lora_A, ad.lora_B])):
        assert rel_err(a, b) <= 1e-5


def _two_adapter_layer():
    torch.manual_seed(0)
    layer = LinearLora(nn.Linear(12, 10).double().requires_grad_(False))
    for name in ("a", "b"):
        layer.add_adapter(name, r=4, lora_alpha=8, dropout=0.0, use_rslora=False, init=False)
    return layer


def _same_with_and_without_fast_path(layer, x):
    out = layer(x)
    with settings.override(fused=False):
        ref = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_fallbacks_give_the_general_path():
    layer, x = _two_adapter_layer(), torch.randn(4, 3, 12, dtype=torch.float64)
    layer.active = ["a", "b"]  # several adapters: general path
    assert layer.plan(x).path == "reference"
    _same_with_and_without_fast_path(layer, x)
    layer.active = ["a"]
    assert layer.plan(x).path == "fused"
    _same_with_and_without_fast_path(layer, x)
    layer.row_adapters = ["a", "b", BASE, "a"]  # mixed batch
    assert layer.plan(x).path == "reference"
    _same_with_and_without_fast_path(layer, x)
    layer.row_adapters = None
    layer.merge(["a"])  # merged: the base alone computes it
    assert layer.plan(x).path == "reference"
    _same_with_and_without_fast_path(layer, x)
    layer.unmerge()
    layer.disabled = True
    assert layer.plan(x).path == "reference"
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.disabled = False
    assert layer.plan(x.float()).path == "reference"  # dtype mismatch: general path casts
    layer.adapters["a"].lora_B.data = layer.adapters["a"].lora_B.data.float()
    assert layer.plan(x).path == "reference"  # A and B of different dtypes: general path
    layer.adapters["a"].lora_B.data = layer.adapters["a"].lora_B.data.double()
    layer.base_layer.weight.requires_grad_(True)  # a trainable base weight needs its gradient
    assert layer.plan(x).path == "reference"
    with settings.override(fused=False):
        assert layer.plan(x).path == "reference"


def _lora_llama(p, **kw):
    model = tiny_llama(**kw)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    return get_lora_model(model, cfg).train()


def _loss_and_grads(lm, x):
    loss = lm(input_ids=x, labels=x).loss
    params = [p for p in lm.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_llama_grads_equal_reference_path(dtype):
    lm = _lora_llama(0.0).to(dtype)
    x = ids(2, 8)
    loss, grads = _loss_and_grads(lm, x)
    with settings.override(fused=False):
        ref_loss, ref_grads = _loss_and_grads(lm, x)
    assert rel_err(loss, ref_loss) <= TOL[dtype]
    assert max(rel_err(a, b) for a, b in zip(grads, ref_grads)) <= 10 * TOL[dtype]


def test_tiny_llama_with_dropout_equals_reference_with_the_same_masks(record_masks, monkeypatch):
    p = 0.2
    lm = _lora_llama(p).double()
    x = ids(2, 8)
    loss, grads = _loss_and_grads(lm, x)
    # The fast path drew one mask per input tensor (q/k/v share one, gate/up share one): 4 per decoder layer.
    assert len(record_masks) == 4 * 2
    per_module = [m for layer in range(2) for m, n in zip(record_masks[4 * layer:4 * layer + 4], (3, 1, 2, 1))
                  for _ in range(n)]  # q k v | o | gate up | down, in the order the reference calls them
    replay = iter(per_module)

    def dropout(t, rate, training):
        return t * next(replay).view(t.shape) / (1 - rate) if training and rate else t

    monkeypatch.setattr(LF, "F", types.SimpleNamespace(linear=F.linear, dropout=dropout))
    with settings.override(fused=False):
        ref_loss, ref_grads = _loss_and_grads(lm, x)
    assert next(replay, None) is None
    assert rel_err(loss, ref_loss) <= 1e-12
    assert max(rel_err(a, b) for a, b in zip(grads, ref_grads)) <= 1e-10


def test_gradient_checkpointing_recomputes_the_same_masks():
    p = 0.3
    x = ids(2, 8)
    results = []
    for checkpointing in (False, True):
        lm = _lora_llama(p)
        if checkpointing:
            lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(123)
        results.append(_loss_and_grads(lm, x))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) <= 1e-6
    assert max(rel_err(a, b) for a, b in zip(g1, g0)) <= 1e-5


def test_gpt2_conv1d_model_grads_equal_reference_path():
    model = tiny_gpt2()
    lm = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                          init_lora_weights=False)).eval()  # GPT-2 has its own dropout
    x = ids(2, 8)
    loss, grads = _loss_and_grads(lm, x)
    with settings.override(fused=False):
        ref_loss, ref_grads = _loss_and_grads(lm, x)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, ref_grads)) <= 1e-5


def test_unmerged_inference_and_merge_agree():
    lm = _lora_llama(0.1).eval()
    x = ids(2, 8)
    with torch.no_grad():
        fast = lm(input_ids=x).logits
        with settings.override(fused=False):
            ref = lm(input_ids=x).logits
        lm.merge_adapter()
        merged = lm(input_ids=x).logits
        lm.unmerge_adapter()
    assert rel_err(fast, ref) <= 1e-6 and rel_err(merged, ref) <= 1e-5


def test_stored_masks_path_matches_reference_and_checkpointing(monkeypatch, record_masks):
    """Off CPU a draw is a bool mask that the nodes save (no seeded kernel there); run that path here."""
    monkeypatch.setattr(fused, "_seeded_masks", lambda device: False)
    p = 0.25
    layers = _sibling_layers(p, torch.float64)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [layer(x) for layer in layers]
    (mask,) = record_masks
    assert [t.dtype for t in saved if t.dtype == torch.bool] == [torch.bool] * 3  # the one mask, saved by each
    layers[0](torch.randn(2, 24, dtype=torch.float64))  # the next input: the cache lets go of the mask
    params = [x] + [t for layer in layers for t in (layer.adapters["a"].lora_A, layer.adapters["a"].lora_B)]
    gs = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, params, gs)
    refs = [_reference(x, layer.weight, layer.base_layer.bias, layer.adapters["a"].lora_A,
                       layer.adapters["a"].lora_B, layer.adapters["a"].scaling, mask, p) for layer in layers]
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= 1e-12
    for a, b in zip(got, torch.autograd.grad(refs, params, gs)):
        assert rel_err(a, b) <= 1e-12
    test_gradient_checkpointing_recomputes_the_same_masks()  # checkpointing drops and recomputes stored masks


def test_the_plan_names_the_path_the_library_and_the_dropout(gemm_route):
    """``LinearLora.plan(x)`` is the seam for the kernel policy: which path a call takes, and why."""
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    layer = lm.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    lm.train()
    plan = layer.plan(x)
    assert plan.path == "fused" and plan.matmul == ("oneDNN" if gemm_route == "onednn" else "torch.mm")
    assert plan.dropout == ("seeded, compiled kernel" if seeded.kernel() is not None else "seeded, numpy")
    lm.eval()
    assert layer.plan(x).dropout == "none"
    with settings.override(fused=False):
        assert layer.plan(x) == fused.Plan("reference", "the fused path is off (LORATUNE_FUSED=0 or "
                                                         "settings.override(fused=False))")
    assert "torch.float64" in layer.plan(x.double()).reason
    with lm.disable_adapter():
        assert layer.plan(x).reason == "adapters are disabled"
    lm.merge_adapter()
    assert layer.plan(x).reason == "the adapter is merged"
