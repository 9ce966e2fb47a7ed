"""Fused RMSNorm and SwiGLU (blocks.py): the kernel against float64 references, the fallbacks, and install."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from loratune import LoraConfig, get_lora_model, settings
from loratune.ops import blocks

from conftest import LLAMA_TARGETS, ids, rel_err, tiny_llama


@pytest.fixture
def native():
    assert blocks.LIBRARY.get() is not None, "the blocks kernel did not build on this machine"


@pytest.fixture(params=[1, 2])
def threads(request, monkeypatch):
    monkeypatch.setattr(blocks.LIBRARY, "threads", lambda: request.param)  # rows/chunks split: same values


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 13), (513, 64), (4, 32, 576)])
def test_rms_norm_matches_float64(native, threads, shape):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * 3).requires_grad_(True)
    w = torch.rand(shape[-1]) + 0.5
    g = torch.randn(shape)
    y = blocks.rms_norm(x, w, 1e-5)
    assert y.grad_fn is not None and "_RMSNorm" in type(y.grad_fn).__name__  # the kernel ran
    (gx,) = torch.autograd.grad(y, x, g)
    xd = x.detach().double().requires_grad_(True)
    yd = blocks.rms_norm_reference(xd, w.double(), 1e-5)
    (gxd,) = torch.autograd.grad(yd, xd, g.double())
    assert _max_rel(y, yd) < 2e-6 and _max_rel(gx, gxd) < 1e-5


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4095, 4097, 3 * 1536 + 5])
def test_swiglu_matches_float64(native, threads, n):
    torch.manual_seed(n)
    a = torch.randn(n) * 4
    if n >= 8:  # (alone, a saturated element's float64 value is below float32's range: nothing to compare)
        a[:4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])  # saturated σ, and zero
    a.requires_grad_(True)
    b = torch.randn(n, requires_grad=True)
    g = torch.randn(n)
    h = blocks.swiglu(a, b)
    assert "_SwiGLU" in type(h.grad_fn).__name__
    ga, gb = torch.autograd.grad(h, (a, b), g)
    ad, bd = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    hd = F.silu(ad) * bd
    gad, gbd = torch.autograd.grad(hd, (ad, bd), g.double())
    assert _max_rel(h, hd) < 2e-6 and _max_rel(ga, gad) < 1e-5 and _max_rel(gb, gbd) < 1e-5
    assert torch.isfinite(h).all() and torch.isfinite(ga).all()


def test_fallbacks_are_torchs_own_ops(native, monkeypatch):
    """Where the kernel does not apply, the result is the reference's, bit for bit (and the gradient flows)."""
    torch.manual_seed(0)
    x, a, b = torch.randn(4, 24), torch.randn(4, 24), torch.randn(4, 24)
    w = torch.rand(24) + 0.5
    trained = w.clone().requires_grad_(True)  # a trained norm weight needs its own gradient: reference path
    y = blocks.rms_norm(x, trained, 1e-6)
    assert torch.equal(y, blocks.rms_norm_reference(x, trained, 1e-6))
    y.sum().backward()
    assert trained.grad is not None
    for dtype in (torch.bfloat16, torch.float64):  # the kernel is float32 only
        assert torch.equal(blocks.rms_norm(x.to(dtype), w.to(dtype), 1e-6),
                           blocks.rms_norm_reference(x.to(dtype), w.to(dtype), 1e-6))
        assert torch.equal(blocks.swiglu(a.to(dtype), b.to(dtype)), F.silu(a.to(dtype)) * b.to(dtype))
    with settings.override(fused=False):
        assert torch.equal(blocks.rms_norm(x, w, 1e-6), blocks.rms_norm_reference(x, w, 1e-6))
        assert torch.equal(blocks.swiglu(a, b), F.silu(a) * b)
    monkeypatch.setattr(blocks.LIBRARY, "lib", None)  # no compiler on this machine
    assert torch.equal(blocks.swiglu(a, b), F.silu(a) * b)
    assert torch.equal(blocks.swiglu(a, b[:1]), F.silu(a) * b[:1])  # broadcasting: torch's ops


def _registered():
    return sorted(blocks.registry(), key=lambda t: t.__name__)


@pytest.mark.parametrize("cls", _registered(), ids=lambda t: t.__name__)
def test_each_registered_type_computes_what_its_fused_forward_assumes(cls, native):
    """The registry's promise, checked against the installed transformers: each registered type's own forward
    is what the fused one computes, values and input gradients (a changed upstream class would fail here)."""
    import importlib

    torch.manual_seed(0)
    module_of = importlib.import_module(cls.__module__)
    config_cls = getattr(module_of, cls.__name__.removesuffix("RMSNorm").removesuffix("MLP") + "Config")
    config = config_cls(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, hidden_act="silu")
    module = cls(48, eps=1e-5) if "RMSNorm" in cls.__name__ else cls(config)
    for p in module.parameters():
        if p.dim() == 1:  # a norm weight: ones would hide a weight applied wrongly
            p.data.uniform_(0.5, 1.5)
    module.requires_grad_(False)
    fused_module = copy.deepcopy(module)
    assert blocks.install(fused_module) == 1
    x = torch.randn(3, 5, 48, requires_grad=True)
    xf = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 48)
    y, yf = module(x), fused_module(xf)
    y.backward(g), yf.backward(g)
    assert rel_err(yf, y) < 1e-6 and rel_err(xf.grad, x.grad) < 1e-5


def test_reference_is_transformers_rms_norm():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(40, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 40)
    assert torch.equal(blocks.rms_norm_reference(x, norm.weight, 1e-5), norm(x))


def _random_norms(model):
    torch.manual_seed(7)
    for m in model.modules():
        if isinstance(m, LlamaRMSNorm):
            m.weight.data.uniform_(0.5, 1.5)  # ones would hide a weight applied wrongly
    return model


def test_install_fuses_norms_and_mlps_and_keeps_the_function(native):
    stock = _random_norms(tiny_llama(layers=2)).train()
    model = copy.deepcopy(stock)
    keys = list(model.state_dict())
    assert blocks.install(model) == 2 * 2 + 1 + 2  # two norms per layer, the final norm, one MLP per layer
    assert blocks.install(model) == 0  # idempotent
    assert list(model.state_dict()) == keys and type(model.model.norm) is LlamaRMSNorm
    x = ids()
    emb_s = stock.get_input_embeddings()(x).detach().requires_grad_(True)
    emb_f = emb_s.detach().clone().requires_grad_(True)
    out_s = stock(inputs_embeds=emb_s).logits
    out_f = model(inputs_embeds=emb_f).logits
    g = torch.randn_like(out_s)
    out_s.backward(g), out_f.backward(g)
    assert rel_err(out_f, out_s) < 1e-6 and rel_err(emb_f.grad, emb_s.grad) < 1e-5
    blocks.uninstall(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(inputs_embeds=emb_s).logits, out_s)


def test_installed_forwards_run_the_kernel(native, monkeypatch):
    model = _random_norms(tiny_llama(layers=1)).requires_grad_(False)  # frozen, as under LoraModel
    blocks.install(model)
    calls = []
    for name in ("lt_rms_norm_fwd", "lt_swiglu_fwd"):  # the kernel's forward entry points, counted
        fn = getattr(blocks.LIBRARY.lib, name)
        monkeypatch.setattr(blocks.LIBRARY.lib, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a))
    model(input_ids=ids())
    model.model.norm.weight.requires_grad_(True)  # a trained norm: its own forward, for its weight's gradient
    model(input_ids=ids())
    assert calls.count("lt_rms_norm_fwd") == 3 + 2 and calls.count("lt_swiglu_fwd") == 2


def test_what_install_leaves_alone():
    model = tiny_llama(layers=1)
    mlp = model.model.layers[0].mlp
    mlp.act_fn = torch.nn.GELU()  # not SwiGLU: its own forward stays
    hooked = model.model.norm
    hooked.forward = lambda x: x  # replaced by someone else (accelerate's hooks do this): not ours to touch
    assert blocks.install(model) == 2
    assert "forward" not in mlp.__dict__ and hooked.forward(torch.ones(1)).item() == 1.0
    blocks.uninstall(model)
    assert "forward" in hooked.__dict__  # still theirs


def test_lora_model_installs_and_unwrapping_removes(native):
    base = _random_norms(tiny_llama(layers=2))
    stock = copy.deepcopy(base)
    lm = get_lora_model(base, LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    assert isinstance(lm.model.model.layers[0].mlp, LlamaMLP)
    assert sum(1 for m in lm.modules() if "forward" in m.__dict__) == 7
    twin = copy.deepcopy(lm)  # a copy's fused forwards are bound to the copy's modules
    assert twin.model.model.norm.forward.__self__ is twin.model.model.norm
    x = ids()
    assert torch.equal(twin(input_ids=x).logits, lm(input_ids=x).logits)
    merged = lm.merge_and_unload()
    assert not any("forward" in m.__dict__ for m in merged.modules())
    assert rel_err(merged(input_ids=x).logits, twin(input_ids=x).logits) < 1e-5
    assert torch.equal(twin.unload()(input_ids=x).logits, stock(input_ids=x).logits)  # stock again


def test_without_a_compiler_the_blocks_warn_once_and_run_torchs_ops(monkeypatch, tmp_path, configure):
    monkeypatch.setattr(blocks.LIBRARY, "lib", False)  # not tried yet
    configure(cache=tmp_path)
    configure(cc="/bin/false")
    a, b = torch.randn(5, 9), torch.randn(5, 9)
    with pytest.warns(RuntimeWarning, match="blocks kernel could not be built.*RMSNorm and SwiGLU as torch ops"):
        h = blocks.swiglu(a, b)
    assert torch.equal(h, F.silu(a) * b) and blocks.LIBRARY.get() is None  # decided once
    assert not list(tmp_path.rglob("*.so*"))


def test_the_kernels_are_custom_ops_that_pass_opcheck(native):
    """Registered with torch.library (fake implementations, autograd): opcheck runs the schema, fake-tensor,
    autograd-registration and AOT-dispatch checks on each."""
    x, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(16)
    a, b = torch.randn(4, 24, requires_grad=True), torch.randn(4, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.loratune.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.loratune.swiglu.default, (a, b))
    y, r = torch.ops.loratune.rms_norm(x.detach(), w, 1e-6)
    torch.library.opcheck(torch.ops.loratune.rms_norm_backward.default, (torch.randn_like(y), x.detach(), w, r))
    torch.library.opcheck(torch.ops.loratune.swiglu_backward.default, (torch.randn(4, 24), a.detach(), b.detach()))


def test_meta_tensors_trace_the_fused_forwards(native):
    """On the meta device (shapes only) the fused forwards give the stock modules' shapes."""
    model = tiny_llama()
    blocks.install(model)
    for m in (model.model.norm, model.model.layers[0].mlp):
        x = torch.empty(2, 3, 64, device="meta")
        assert m.to("meta")(x).shape == (2, 3, 64)
    y, r = torch.ops.loratune.rms_norm(torch.empty(2, 7, 16, device="meta"), torch.empty(16, device="meta"), 1e-6)
    assert y.shape == (2, 7, 16) and r.shape == (14,) and y.device.type == "meta"


def test_torch_compile_runs_the_fused_blocks(native):
    """torch.compile of a block with the fused forwards traces loratune's ops (no graph break) and matches eager,
    forward and backward."""
    model = _random_norms(tiny_llama()).requires_grad_(False)  # frozen, as under LoraModel
    blocks.install(model)
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].input_layernorm

    def f(x):
        return mlp(norm(x)).square().sum()

    x = torch.randn(2, 5, 64, requires_grad=True)
    eager = f(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    traced = []

    def backend(gm, example_inputs):  # what dynamo traced, then aot_eager runs it
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(f, backend=backend, fullgraph=True)(x)
    (g_compiled,) = torch.autograd.grad(compiled, x)
    assert rel_err(compiled, eager) < 1e-6 and rel_err(g_compiled, g_eager) < 1e-6
    assert any("loratune.rms_norm" in t for t in traced) and any("loratune.swiglu" in t for t in traced)
