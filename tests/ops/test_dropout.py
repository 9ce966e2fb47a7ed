"""Seeded dropout masks: the compiled kernel against the numpy definition, the rate, and the fallback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loratune.ops import dropout as seeded


@pytest.fixture
def native():
    lib = seeded.kernel()
    assert lib is not None, "the dropout kernel did not build on this machine"
    return lib


@pytest.mark.parametrize("n", [1, 7, 8, 9, 511, 512, 513, 4101, 300_007])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 1 / 256, 0.999])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_draws_the_reference_bits(native, n, p, threads, monkeypatch):
    monkeypatch.setattr(seeded, "_threads", lambda: threads)  # blocks split over threads: the same bits
    seed = seeded.new_seed()
    want = torch.from_numpy(seeded.keep_mask_reference(n, seed, p))
    assert torch.equal(seeded.keep_mask(torch.Size([n]), seed, p), want)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(n, dtype=dtype)
        assert torch.equal(seeded.apply_mask(x, seed, p), x * want)
        y = x.clone()
        assert seeded.apply_mask(y, seed, p, out=y) is y and torch.equal(y, x * want)  # in place


def test_mask_follows_the_flattened_index_and_other_layouts_agree(native):
    seed, p = seeded.new_seed(), 0.4
    x = torch.randn(30, 17)
    want = x * seeded.keep_mask(x.shape, seed, p)
    assert torch.equal(want.flatten(), x.flatten() * torch.from_numpy(seeded.keep_mask_reference(510, seed, p)))
    xt = x.t().contiguous().t()  # the same values, column-major: the kernel sees a contiguous copy
    assert torch.equal(seeded.apply_mask(xt, seed, p), want)
    out = torch.empty(17, 30).t()  # a non-contiguous output: the torch path
    assert torch.equal(seeded.apply_mask(x, seed, p, out=out), want)
    xb = x.bfloat16()  # no kernel for bf16: the mask kernel, then a multiply
    assert torch.equal(seeded.apply_mask(xb, seed, p), xb * seeded.keep_mask(x.shape, seed, p))


@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("impl", ["native", "numpy"])
def test_drop_rate_is_p(p, impl):
    n = 2_000_000
    keep = seeded.keep_mask(torch.Size([n]), 12345, p) if impl == "native" else \
        torch.from_numpy(seeded.keep_mask_reference(n, 12345, p))
    sigma = (p * (1 - p) / n) ** 0.5
    # 5 standard errors; at p = 0.05 the edge rule (byte == t) moves the rate by 0.8/256 = 20 standard errors,
    # so a kernel that got it wrong fails here.
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * sigma


def test_different_seeds_and_positions_are_independent(native):
    a = seeded.keep_mask(torch.Size([200_000]), 1, 0.5).double()
    b = seeded.keep_mask(torch.Size([200_000]), 2, 0.5).double()
    # agreement between two seeds, and between neighbouring elements of one seed, is 1/2 within 5 standard errors
    sigma = (0.25 / 200_000) ** 0.5
    assert abs((a == b).double().mean().item() - 0.5) < 5 * sigma
    assert abs((a[1:] == a[:-1]).double().mean().item() - 0.5) < 5 * sigma


def test_thresholds_split_p():
    t, f = seeded.thresholds(0.05)
    assert t == 12 and abs((t + f / 2**32) / 256 - 0.05) < 2**-40
    assert seeded.thresholds(0.5) == (128, 0)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            seeded.thresholds(bad)


def test_without_a_compiler_it_warns_once_and_falls_back(monkeypatch, tmp_path, configure):
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)  # not tried yet
    configure(cache=tmp_path)
    configure(cc="/bin/false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="install a C compiler"):
        assert seeded.kernel() is None
    assert seeded.kernel() is None  # decided once: no second warning, no second try
    assert not list(tmp_path.rglob("*.so*"))  # nothing half-written left behind
    x = torch.randn(1000)
    assert torch.equal(seeded.apply_mask(x, 7, 0.2), x * torch.from_numpy(seeded.keep_mask_reference(1000, 7, 0.2)))


def test_kernel_builds_into_the_cache_atomically(monkeypatch, tmp_path, configure):
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)
    configure(cache=tmp_path)
    assert seeded.kernel() is not None
    (built,) = (tmp_path / "kernels").iterdir()  # one file, the final name: no temp file left
    assert built.name.startswith("dropout-") and built.suffix == ".so"


def test_kernel_threads_are_torchs(native):
    """The kernel's OpenMP resolves to the libgomp torch loaded: one runtime, so its threads are torch's. Checked in a
    fresh process: in this one, other test modules load other OpenMP runtimes (scikit-learn's, llama.cpp's)."""
    code = ("from loratune.ops import dropout as seeded; assert seeded.kernel() is not None; "
            "runtimes = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line}; "
            "print(len(runtimes), seeded.LIBRARY.threads_ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, threads_ok = out.stdout.split()
    assert int(count) <= 1 and threads_ok == str(int(count) == 1)


def test_native_off_by_environment(monkeypatch, configure):
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)
    configure(native=False)
    assert seeded.kernel() is None


def test_off_cpu_tensors_are_refused_with_the_reason():
    x = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="computed on the CPU"):
        seeded.apply_mask(x, 1, 0.5)


def test_a_damaged_cached_kernel_is_rebuilt(monkeypatch, tmp_path, configure):
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)
    configure(cache=tmp_path / "first")
    assert seeded.kernel() is not None
    (built,) = (tmp_path / "first" / "kernels").iterdir()  # its name: what a damaged entry would be called
    damaged = tmp_path / "second" / "kernels" / built.name  # (not the loaded file: rewriting that would crash)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared library")
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)
    configure(cache=tmp_path / "second")
    assert seeded.kernel() is not None and damaged.read_bytes()[:4] == b"\x7fELF"
    assert torch.equal(seeded.keep_mask(torch.Size([999]), 3, 0.1),
                       torch.from_numpy(seeded.keep_mask_reference(999, 3, 0.1)))


def test_an_unusable_cache_directory_is_named_in_the_warning(monkeypatch, tmp_path, configure):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)
    configure(cache=not_a_dir)
    with pytest.warns(RuntimeWarning, match="point \\$LORATUNE_CACHE at a writable directory"):
        assert seeded.kernel() is None


def test_a_compiler_that_is_not_there_is_named_in_the_warning(monkeypatch, tmp_path, configure):
    monkeypatch.setattr(seeded.LIBRARY, "lib", False)
    configure(cache=tmp_path)
    configure(cc=str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="no-such-cc.*install a C compiler"):
        assert seeded.kernel() is None


def test_the_kernel_is_a_custom_op_that_passes_opcheck(native):
    """Registered with torch.library (fake implementations): opcheck runs the schema and fake-tensor checks."""
    x = torch.randn(7, 33)
    torch.library.opcheck(torch.ops.loratune.seeded_dropout.default, (x, torch.empty_like(x), 1234, 0.1))
    torch.library.opcheck(torch.ops.loratune.dropout_keep_mask.default, (torch.empty(7, 33, dtype=torch.bool), 5, 0.3))
    out = torch.empty(7, 33, device="meta")  # shapes only: the op traces without running the kernel
    torch.ops.loratune.seeded_dropout(torch.empty(7, 33, device="meta"), out, 1, 0.5)
