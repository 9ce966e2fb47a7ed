"""benchmarks/gemm_ceiling.py: the FMA loop does the work it is credited with, and the report runs end to end."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from conftest import load_benchmark

gemm_ceiling = load_benchmark("gemm_ceiling")


def _lib():
    lib = gemm_ceiling.LIBRARY.get()
    if lib is None or not lib.lt_fma_available():
        pytest.skip("no compiled AVX2 FMA loop on this machine")
    return lib


@pytest.mark.parametrize("iters, threads", [(1, 1), (1000, 1), (777, 2)])
def test_fma_loop_runs_every_chain_for_every_iteration(iters, threads):
    """The peak is credited with iters × 10 chains × 8 lanes × 2 flops per thread; a loop the compiler shortened
    (merged chains, skipped iterations) would return a different value than the recurrence a ← a·b + c run
    ``iters`` times on each of the ten chains, summed over the threads."""
    ran = ctypes.c_int(0)
    got = _lib().lt_fma_loop(iters, threads, ctypes.byref(ran))
    assert 1 <= ran.value <= threads
    s = np.float32(1.0 + (iters & 7) * 1e-3)
    b = [np.float32(0.9999), np.float32(0.9998)]
    chains = [np.float64(np.float32(s + np.float32(0.1) * np.float32(j))) for j in range(10)]
    for _ in range(iters):
        chains = [a * np.float64(b[j % 2]) + 1e-7 for j, a in enumerate(chains)]
    want = ran.value * sum(chains)
    assert got == pytest.approx(want, rel=1e-5)


def test_report_runs_on_small_shapes(monkeypatch, capsys):
    """measure() and print_report() on small stand-in shapes: every product timed on each thread count, GFLOP/s
    positive, the numpy column for base products only."""
    monkeypatch.setattr(gemm_ceiling, "BASE", [("base", 64, 32, 48)])
    monkeypatch.setattr(gemm_ceiling, "THIN", [("thin", 64, 32, 4)])
    monkeypatch.setattr(gemm_ceiling, "fma_peak", lambda threads, repeats: 10.0 * threads)
    res = gemm_ceiling.measure(threads=2, repeats=2)
    assert res["threads"] == [1, 2]
    base, thin = res["products"]
    assert set(base["torch_gflops"]) == {1, 2} and all(v > 0 for v in base["torch_gflops"].values())
    assert base["numpy_gflops"] > 0 and "numpy_gflops" not in thin
    gemm_ceiling.print_report(res)
    out = capsys.readouterr().out
    assert "1 thread 10, 2 threads 20" in out and "64×32·32×48" in out


@pytest.mark.parametrize("argv, says", [(["--threads", "0"], "must be at least 1"),
                                         (["--json", "/nonexistent-dir/x.json"], "its directory does not exist")])
def test_bad_arguments_are_one_line_errors(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(gemm_ceiling, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as e:
        gemm_ceiling.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err
