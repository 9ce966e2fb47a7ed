"""The thin (rank-r) products: the compiled kernel and its matrix-library fallback against float64."""

from __future__ import annotations

import pytest
import torch

from loratune import dropout as seeded
from loratune import fused, gemm, thin

from conftest import rel_err

SHAPES = [(512, 576, 16), (37, 100, 8), (5, 3, 1), (64, 200, 40), (9, 1030, 16), (13, 50, 24)]


@pytest.fixture(params=["kernel", "blas"])
def route(request, monkeypatch):
    monkeypatch.setattr(thin, "_MODE", "1")  # the kernel on whatever this CPU's default
    before = thin.use_kernel(request.param == "kernel")
    if request.param == "kernel":
        assert thin.LIBRARY.get() is not None, "the thin kernel did not build on this machine"
    yield request.param
    thin.use_kernel(before)


def _mk(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T,d,r", SHAPES)
def test_products_match_float64(T, d, r, route):
    x, mt, u, m = _mk(T, d, seed=1), _mk(d, r, seed=2), _mk(T, r, seed=3), _mk(r, d, seed=4)
    D = torch.Tensor.double
    assert thin.applies(x, mt, r) == (route == "kernel")
    assert rel_err(thin.project(x, mt, 2.0), 2 * D(x) @ D(mt)) <= 1e-5
    assert rel_err(thin.project(x, m.t(), 0.5), 0.5 * D(x) @ D(m).t()) <= 1e-5  # a transposed (strided) operand
    assert rel_err(thin.outer(x, u, 0.25), 0.25 * D(x).t() @ D(u)) <= 1e-5
    assert rel_err(thin.expand(u, m, 3.0), 3 * D(u) @ D(m)) <= 1e-5
    y = _mk(T, d, seed=5)
    got = thin.expand(u, m, 3.0, out=y.clone(), accumulate=True)
    assert rel_err(got, 3 * D(u) @ D(m) + D(y)) <= 1e-5


@pytest.mark.parametrize("T,d,r", SHAPES)
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_masked_expand_applies_the_seeded_draw(T, d, r, p, route):
    """keep=(seed, p) multiplies by exactly the keep mask dropout.py defines (zeros exactly where it drops)."""
    u, m, y = _mk(T, r, seed=1), _mk(r, d, seed=2), _mk(T, d, seed=3)
    keep = seeded.keep_mask(torch.Size((T, d)), 987654321, p)
    want = 1.5 * (u.double() @ m.double()) * keep.double()
    got = thin.expand(u, m, 1.5, keep=(987654321, p))
    assert rel_err(got, want) <= 1e-5
    assert torch.equal(got == 0, ~keep)
    added = thin.expand(u, m, 1.5, out=y.clone(), accumulate=True, keep=(987654321, p))
    assert rel_err(added, want + y.double()) <= 1e-5


def test_rows_with_a_stride_are_read_in_place(route):
    """x may be a column slice of a wider tensor (rows of unit stride, a longer row pitch)."""
    wide = _mk(40, 90)
    x, mt, u = wide[:, 10:74], _mk(64, 16, seed=1), _mk(40, 16, seed=2)
    assert rel_err(thin.project(x, mt), x.double() @ mt.double()) <= 1e-5
    assert rel_err(thin.outer(x, u), x.double().t() @ u.double()) <= 1e-5


def test_bad_out_is_refused():
    u, m = _mk(4, 2), _mk(2, 6)
    with pytest.raises(ValueError, match="accumulate=True needs"):
        thin.expand(u, m, accumulate=True)
    with pytest.raises(ValueError, match=r"contiguous \(4, 6\)"):
        thin.expand(u, m, out=torch.empty(6, 4).t())


def test_default_is_on_for_avx512_builds_and_whole_vector_ranks_only(monkeypatch):
    lib = thin.LIBRARY.get()
    assert lib is not None
    monkeypatch.setattr(thin, "_MODE", "auto")
    assert lib.lanes == lib.lt_thin_lanes()
    wide = lib.lanes >= 16
    assert thin._wide_enough(lib, 16) == thin._wide_enough(lib, 32) == wide
    assert not thin._wide_enough(lib, 8)  # padded to 16 lanes: half the work on zeros
    monkeypatch.setattr(thin, "_MODE", "0")
    assert not thin._wide_enough(lib, 16)
    monkeypatch.setattr(thin, "_MODE", "1")
    assert thin._wide_enough(lib, 8) and thin._wide_enough(lib, 16)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_layer_takes_the_kernel_and_stays_exact(onednn, p, monkeypatch):
    """The fused LoRA linear with the kernel forced on makes its thin products there (both matrix routes: base
    product first on oneDNN, the term first on torch.mm) and its output and gradients equal the BLAS path's."""
    monkeypatch.setattr(thin, "_MODE", "1")
    monkeypatch.setattr(gemm, "MIN_MACS", 0)
    calls = []
    for name in ("lt_thin_project", "lt_thin_outer", "lt_thin_expand"):
        fn = getattr(thin.LIBRARY.get(), name)
        monkeypatch.setattr(thin.LIBRARY.lib, name, lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1])
    x = _mk(3, 40, 48).requires_grad_()
    W, A, B = _mk(56, 48, seed=1), _mk(8, 48, seed=2).requires_grad_(), _mk(56, 8, seed=3).requires_grad_()
    g = _mk(3, 40, 56, seed=4)
    results = []
    with gemm.use_onednn(onednn):
        for on in (True, False):
            before = thin.use_kernel(on)
            torch.manual_seed(7)  # the same dropout draw both times
            out = fused.lora_linear(x, W, None, A, B, 2.0, p, training=True)
            results.append([out, *torch.autograd.grad(out, [x, A, B], g)])
            thin.use_kernel(before)
    assert sorted(set(calls)) == ["lt_thin_expand", "lt_thin_outer", "lt_thin_project"]
    for got, want in zip(*results):
        assert rel_err(got, want) <= 1e-5


def test_a_header_change_rebuilds_the_kernel(tmp_path):
    """The build's cache key covers the local headers a kernel includes (dropout_mask.h here), not just its file."""
    from loratune import native

    (tmp_path / "k.c").write_text('#include "m.h"\nint f(void) { return M; }\n')
    (tmp_path / "m.h").write_text("#define M 1\n")
    before = native._source_text(tmp_path / "k.c")
    (tmp_path / "m.h").write_text("#define M 2\n")
    assert native._source_text(tmp_path / "k.c") != before
    assert b"dropout_mask" in native._source_text(thin.LIBRARY.source)


def test_an_unknown_env_value_warns_and_falls_back_to_auto(monkeypatch):
    monkeypatch.setenv("LORATUNE_THIN", "maybe")
    with pytest.warns(UserWarning, match="LORATUNE_THIN='maybe' is not understood"):
        assert thin._mode_from_env() == "auto"
    monkeypatch.setenv("LORATUNE_THIN", "0")
    assert thin._mode_from_env() == "0"
