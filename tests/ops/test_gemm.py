"""gemm.linear against float64, on both routes (oneDNN and torch.mm), for every operand layout the callers use."""

from __future__ import annotations

import pytest
import torch

from loratune import settings
from loratune.ops import gemm

from conftest import rel_err

pytestmark = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def route_small_products(monkeypatch):
    """The products here are small; route them anyway (test_small_products_stay_on_torch checks the threshold),
    with the routing on whatever this CPU's default (the tests that need it off say so)."""
    monkeypatch.setattr(gemm, "MIN_MACS", 0)
    with settings.override(onednn=True):
        yield


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# (x, w) as the fused path and the loss pass them: x·Wᵀ, us·Bᵀ, g·B (w = B.t()), gu·A (w = A.t()), g·W (w = W.t()),
# guᵀ·xd (x = gu.t(), w = xd.t()), and a strided x.
LAYOUTS = {
    "x·Wᵀ": lambda: (_rand(37, 48), _rand(40, 48, seed=1)),
    "thin x·Aᵀ": lambda: (_rand(37, 48), _rand(4, 48, seed=1)),
    "thin us·Bᵀ": lambda: (_rand(37, 4), _rand(40, 4, seed=1)),
    "g·B (w a transposed view)": lambda: (_rand(37, 40), _rand(40, 4, seed=1).t()),
    "g·W (w a transposed view)": lambda: (_rand(37, 40), _rand(40, 48, seed=1).t()),
    "guᵀ·xd (both transposed views)": lambda: (_rand(37, 4).t(), _rand(37, 48, seed=1).t()),
    "strided x": lambda: (_rand(37, 96)[:, ::2], _rand(40, 48, seed=1)),
}


@pytest.mark.parametrize("route", [True, False], ids=["onednn", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("extras", ["plain", "bias", "other", "bias+other"])
@pytest.mark.parametrize("scale", [1.0, -0.37])
def test_linear_matches_float64(route, layout, extras, scale):
    x, w = LAYOUTS[layout]()
    bias = _rand(w.shape[0], seed=2) if "bias" in extras else None
    other = _rand(x.shape[0], w.shape[0], seed=3) if "other" in extras else None
    want = scale * (x.double() @ w.double().t())
    want = want + (bias.double() if bias is not None else 0) + (other.double() if other is not None else 0)
    with settings.override(onednn=route):
        assert gemm.routed(x, w) is route
        got = gemm.linear(x, w, bias, None if other is None else other.clone(), scale=scale)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= 2e-6  # fp32 with fp32 accumulation, both routes


def test_bf16_is_routed_where_onednn_runs_it_and_close_either_way():
    """oneDNN refuses bf16 products on CPUs without AVX-512 BF16 or AMX: there bf16 stays on torch.mm."""
    x, w = _rand(33, 64, dtype=torch.bfloat16), _rand(24, 64, seed=1, dtype=torch.bfloat16)
    assert gemm.routed(x, w) is torch.ops.mkldnn._is_mkldnn_bf16_supported()
    got = gemm.linear(x, w)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, x.double() @ w.double().t()) <= 1e-2  # bf16 output rounding


def test_what_is_not_routed_still_computes():
    """float64, mixed dtypes and empty inputs go to torch.mm: same result, no error."""
    x, w = _rand(5, 8, dtype=torch.float64), _rand(3, 8, seed=1, dtype=torch.float64)
    assert not gemm.routed(x, w)
    assert torch.equal(gemm.linear(x, w), x @ w.t())
    assert not gemm.routed(x.float(), w)
    empty = torch.empty(0, 8)
    assert not gemm.routed(empty, w.float()) and gemm.linear(empty, w.float()).shape == (0, 3)


def test_use_onednn_restores_the_setting():
    x, w = _rand(5, 8), _rand(3, 8, seed=1)
    for outer in (True, False):
        with settings.override(onednn=outer):
            with settings.override(onednn=not outer):
                assert gemm.routed(x, w) is (not outer) and gemm.routing_on() is (not outer)
            assert gemm.routed(x, w) is outer and gemm.routing_on() is outer


@pytest.mark.parametrize("capability, vendor, want", [
    ("AVX512", "AuthenticAMD", True),  # MKL runs AVX2 kernels on AMD; oneDNN uses AVX-512 (measured faster)
    ("AVX512", "HygonGenuine", True),
    ("AVX512", "GenuineIntel", False),  # MKL uses AVX-512 on Intel itself: torch's default stands
    ("AVX2", "AuthenticAMD", False),  # measured: oneDNN's AVX2 kernels were slower than MKL's here
    ("DEFAULT", "", False),
])
def test_the_default_route_follows_the_cpu(capability, vendor, want):
    assert gemm.default_route(capability, vendor) is want


@pytest.mark.parametrize("flag", [True, False, None])
def test_the_onednn_setting_forces_the_route_or_leaves_it_to_the_cpu(flag):
    with settings.override(onednn=flag):
        want = gemm.default_route() if flag is None else flag
        assert gemm.routing_on() is (want and gemm.onednn_available())


def test_small_products_stay_on_torch(monkeypatch):
    """A oneDNN call costs more than a small product: below MIN_MACS multiply-adds, torch.mm computes it."""
    monkeypatch.setattr(gemm, "MIN_MACS", 1000)
    x, w = _rand(10, 10), _rand(10, 10, seed=1)  # 1000 multiply-adds: routed
    assert gemm.routed(x, w) and not gemm.routed(x[:9], w)
    assert rel_err(gemm.linear(x[:9], w), x[:9].double() @ w.double().t()) <= 2e-6
    monkeypatch.undo()
    assert gemm.MIN_MACS >= 1 << 20  # a decode step's (1 token) products are below the default
    assert not gemm.routed(_rand(1, 576), _rand(1536, 576)) and gemm.routed(_rand(512, 576), _rand(1536, 576))
