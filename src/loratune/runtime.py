"""Process settings for fast CPU training (``train`` applies them; so does the benchmark, to every contestant).

glibc's malloc hands big freed blocks back to the kernel (``munmap``, heap trimming), so a training loop that
frees and reallocates the same activations every step takes a page fault for every 4 KiB of them, every step.
Page faults are slow everywhere and very slow in virtual machines (here 1-5 µs each: a 100 MB logits buffer costs
30-130 ms to touch afresh). GPU frameworks avoid this with caching allocators; on CPU the usual advice is to
preload jemalloc or tcmalloc. ``retain_freed_memory`` gets the same effect from glibc itself: freed memory stays
mapped and is reused, so the resident set stays at the run's peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for big blocks, no trimming. True if it applied.

    A no-op (False) off glibc, or when ``LORATUNE_MALLOC=default`` asks for the allocator's own behaviour.
    """
    if os.environ.get("LORATUNE_MALLOC", "").lower() == "default":
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0)  # big blocks from the heap, where freed ones are reused
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # (an int) never give the heap's top back
    return bool(ok)


def return_freed_memory(threshold: int = 64 * 1024) -> bool:
    """The opposite: give freed blocks over ``threshold`` bytes back at once (mmap them, trim the heap), so the
    resident set follows the live tensors; for measuring memory. True if it applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 65536)
    ok &= libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, threshold)
    return bool(ok)
