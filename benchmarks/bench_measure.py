"""The measuring half of the train-step benchmark (``train_step.py``), shared by the other step benchmarks: fixed
random batches, timing between synchronizations, within-repeat ratios and their spread, and a step's peak memory
(the resident set's growth on CPU, torch's allocator peak on a GPU), with glibc's allocator set to keep or return
freed memory."""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time

import torch


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return input_ids, torch.ones_like(input_ids), input_ids.clone()


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a host clock reads the work's time (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over repeats of a/b within each repeat (see the module doc)."""
    return statistics.median(x / y for x, y in zip(a, b))


def ratio_spread(a: list[float], b: list[float]) -> list[float]:
    """The quartiles [25 %, 75 %] of a/b within each repeat: how far one repeat is from the next, so that a reader
    can tell a difference from this machine's noise."""
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q3]


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def timed(step, model, batch, device: str = "cpu", inner: int = 1) -> float:
    """Seconds per step: the mean of ``inner`` steps, between synchronizations (on a GPU a step is milliseconds of
    queued kernels)."""
    total = 0.0
    for _ in range(inner):
        sync(device)
        start = time.perf_counter()
        step(model, batch)
        sync(device)
        total += time.perf_counter() - start
        zero_grads(model)
    return total / inner


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (malloc.h)


def retain_freed_memory():
    """glibc keeps freed memory mapped for reuse (no mmap for big blocks, no trimming), as a caching allocator
    would: no page faults for re-touching freed activations every step (1-5 µs each on this VM)."""
    if _libc is not None:
        _libc.mallopt(_M_MMAP_MAX, 0)
        _libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def exact_rss_accounting():
    """Make glibc return freed blocks at once (fixed mmap threshold), so the RSS follows live tensors."""
    if _libc is not None:
        _libc.mallopt(_M_MMAP_MAX, 65536)
        _libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        _libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_step_memory_mb(step, model, batch) -> float | None:
    """The growth of the resident set during one step, in MiB (Linux only); on a GPU, of torch's allocated memory."""
    from loratune import ops

    ops.clear_mask_cache()  # (loratune keeps the last input's x⊙mask until the next step)
    ops.release_workspace()  # and its loss's chunk buffer, which the step must then allocate: it counts
    gc.collect()
    if batch[0].device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, batch)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        zero_grads(model)
        return (peak - before) / 2**20
    if _libc is None:
        return None
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    step(model, batch)
    peak = _status_kb("VmHWM")
    zero_grads(model)
    return (peak - before) / 1024
