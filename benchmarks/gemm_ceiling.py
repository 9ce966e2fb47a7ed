"""How fast this CPU's matrix products can go: the fp32 FMA peak against torch's GEMM on the training step's shapes.

Why: the train-step benchmark's targets are ratios, and whether a faster step is possible depends on how close the
frozen base's products already run to the hardware. This measures, in one process:

* the FMA peak: a compiled loop of independent 8-wide fused multiply-adds (``fma_peak_kernel.c``, built like
  loratune's kernels by ``loratune.ops.cpu.build``) on 1 thread and on ``--threads`` threads, best of ``--repeats``;
* torch.mm (MKL on this build) on the base products of one SmolLM2-135M step at 4×128 tokens (the projections and
  the LM head) and on LoRA's thin rank-r products, on 1 and ``--threads`` threads, medians of ``--repeats``;
* the same base products on numpy's BLAS (OpenBLAS in numpy's wheels), as a second library.

Each product's GFLOP/s and its share of the peak on the same thread count are printed (``--json`` writes them).

    python benchmarks/gemm_ceiling.py
    python benchmarks/gemm_ceiling.py --json benchmarks/results/gemm_ceiling_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from loratune.ops.cpu import build as native

TOKENS, HIDDEN, INTER, KV, VOCAB, RANK = 512, 576, 1536, 192, 49152, 16
# (name, M, K, N): an M×K by K×N product, as one SmolLM2-135M training step at 4×128 tokens runs them.
BASE = [("q/o proj", TOKENS, HIDDEN, HIDDEN), ("k/v proj", TOKENS, HIDDEN, KV), ("gate/up proj", TOKENS, HIDDEN, INTER),
        ("down proj", TOKENS, INTER, HIDDEN), ("LM head", TOKENS - 4, HIDDEN, VOCAB),
        ("LM head grad", TOKENS - 4, VOCAB, HIDDEN)]
THIN = [("x·Aᵀ (576)", TOKENS, HIDDEN, RANK), ("u·Bᵀ (1536)", TOKENS, RANK, INTER),
        ("A's grad (576)", RANK, TOKENS, HIDDEN), ("B's grad (1536)", INTER, TOKENS, RANK)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.lt_fma_loop.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.lt_fma_loop.restype = ctypes.c_double
    lib.lt_fma_available.argtypes, lib.lt_fma_available.restype = [], ctypes.c_int


LIBRARY = native.Kernel(Path(__file__).with_name("fma_peak_kernel.c"), _declare, without="without the FMA peak")


def fma_peak(threads: int, repeats: int, iters: int = 50_000_000) -> float | None:
    """GFLOP/s of the FMA loop on ``threads`` threads, best of ``repeats``; None without a compiled AVX2 loop."""
    lib = LIBRARY.get()
    if lib is None or not lib.lt_fma_available():
        return None
    best, ran = 0.0, ctypes.c_int(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.lt_fma_loop(iters, threads, ctypes.byref(ran))
        best = max(best, iters * 10 * 8 * 2 * ran.value / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_gflops(m: int, k: int, n: int, threads: int, repeats: int, library: str = "torch") -> float:
    """GFLOP/s of an m×k by k×n fp32 product into a kept output, median of ``repeats`` after one warm-up.
    ``library``: "torch" (torch.mm on ``threads`` threads) or "numpy" (numpy's BLAS, its own thread count)."""
    g = torch.Generator().manual_seed(0)
    a, b, out = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).t(), torch.empty(m, n)
    if library == "numpy":
        an, bn, on = a.numpy(), b.numpy(), out.numpy()
        run = lambda: np.matmul(an, bn, out=on)  # noqa: E731
    else:
        run = lambda: torch.mm(a, b, out=out)  # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2 * m * k * n / statistics.median(times) / 1e9


def measure(threads: int, repeats: int, numpy_blas: bool = True) -> dict:
    """The peak and every product's GFLOP/s on 1 and ``threads`` threads (see the module doc)."""
    counts = sorted({1, threads})
    peak = {t: fma_peak(t, repeats) for t in counts}
    rows = []
    for kind, shapes in (("base", BASE), ("thin", THIN)):
        for name, m, k, n in shapes:
            row = {"kind": kind, "name": name, "shape": [m, k, n],
                   "torch_gflops": {t: gemm_gflops(m, k, n, t, repeats) for t in counts}}
            if numpy_blas and kind == "base":
                row["numpy_gflops"] = gemm_gflops(m, k, n, threads, repeats, "numpy")
            rows.append(row)
    return {"threads": counts, "fma_peak_gflops": peak, "products": rows,
            "torch": torch.__version__, "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def print_report(res: dict) -> None:
    peak = res["fma_peak_gflops"]
    counts = res["threads"]
    print("FMA peak GFLOP/s: " + ", ".join(f"{t} thread{'s' * (t > 1)} {peak[t]:.0f}" if peak[t] else
                                           f"{t}: n/a (no AVX2 build)" for t in counts))
    head = " ".join(f"{'torch ' + str(t) + 't':>12s} {'of peak':>7s}" for t in counts)
    print(f"{'product':18s} {'M×K·K×N':>18s} {head} {'numpy ' + str(counts[-1]) + 't':>10s}")
    for row in res["products"]:
        m, k, n = row["shape"]
        cells = []
        for t in counts:
            gf = row["torch_gflops"][t]
            cells.append(f"{gf:12.0f} {gf / peak[t]:7.0%}" if peak[t] else f"{gf:12.0f} {'-':>7s}")
        npy = f"{row['numpy_gflops']:10.0f}" if "numpy_gflops" in row else f"{'':10s}"
        print(f"{row['name']:18s} {f'{m}×{k}·{k}×{n}':>18s} {' '.join(cells)} {npy}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="the thread count to compare with one thread")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-numpy", action="store_true", help="skip numpy's BLAS")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be at least 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        ap.error(f"--json {args.json}: its directory does not exist (create it first)")
    res = measure(args.threads, args.repeats, not args.no_numpy)
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
