"""Small C kernels compiled on first use with the system's C compiler, cached per machine, loaded with ctypes.

A kernel is a C file shipped in the package, with the local headers it includes. It is built with
``-march=native`` and OpenMP where those work (flags tried in order), written to
``$LORATUNE_CACHE/kernels/<stem>-<hash>.so`` atomically (temp file + rename), the hash covering the source and its
headers, the compiler, the flags and the CPU. Every caller has a pure-torch or numpy path, so
where no compiler works a kernel is ``None`` with one warning, and ``LORATUNE_NATIVE=0`` forces that.
"""

from __future__ import annotations

import ctypes
import hashlib
import platform
import re
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ... import settings
from ...fsutil import atomic_write

_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-Wno-unknown-pragmas"])


def _cpu_identity() -> str:
    """What -march=native depends on: a build is cached per CPU model and feature set."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:8192]
    except OSError:
        return platform.machine() + platform.processor()


def _one_openmp_runtime() -> bool:
    """Whether the process has exactly one libgomp loaded. A kernel's OpenMP then runs on torch's own intra-op
    threads (they share the runtime: torch loads libgomp.so.1 first, and the kernel's dependency of the same
    name resolves to it). Two runtimes would each keep their threads spinning for the cores: then one thread."""
    try:
        with open("/proc/self/maps") as f:
            return len({line.split()[-1] for line in f if "libgomp" in line}) == 1
    except OSError:
        return False


def _source_text(source: Path) -> bytes:
    """The source and the local headers it includes (``#include "x.h"``, next to it): what a build depends on."""
    text = source.read_bytes()
    headers = re.findall(rb'^\s*#\s*include\s+"([^"]+)"', text, flags=re.MULTILINE)
    return text + b"".join((source.parent / h.decode()).read_bytes() for h in headers)


class _BuildFailed(Exception):
    """The compiler ran and refused these flags: the next set may work."""


def _compile(cc: str, source: Path, target: Path) -> None:
    """Compile ``source`` to ``target`` atomically (``fsutil.atomic_write``), with -march=native and OpenMP where
    they work."""
    errors = []
    for flags in _FLAGS:
        def build(tmp: str, flags: list[str] = flags) -> None:
            cmd = [cc, *flags, "-std=c99", "-shared", "-fPIC", str(source), "-o", tmp, "-lm"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:  # no such compiler, or it hung: other flags won't help
                raise RuntimeError(f"{cc}: {e}") from None
            if res.returncode != 0:
                raise _BuildFailed(res.stderr.strip()[-500:])

        try:
            atomic_write(target, build, mode=0o755)
            return
        except _BuildFailed as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


class Kernel:
    """One C file's compiled library, built once per process on first ``get()``.

    ``declare`` sets the ctypes signatures of its functions; ``without`` says, for the warning, what still works
    (and how) when the kernel cannot be built."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], without: str):
        self.source, self.declare, self.without = source, declare, without
        self.lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable
        self.threads_ok = False  # whether the kernel may use OpenMP threads (see _one_openmp_runtime)
        self._lock = threading.Lock()

    def threads(self) -> int:
        """How many OpenMP threads a call may use: torch's intra-op count, where they share one runtime."""
        return torch.get_num_threads() if self.threads_ok else 1

    def get(self) -> ctypes.CDLL | None:
        """The library, built on first use and cached; None (with one warning) where it cannot be built, or with
        LORATUNE_NATIVE=0."""
        if self.lib is not False:
            return self.lib
        with self._lock:
            if self.lib is False:
                self.lib = None  # decided once: should loading raise, no later call tries again
                self.lib = self._load()
            return self.lib

    def _load(self) -> ctypes.CDLL | None:
        config = settings.get()
        if not config.native:
            return None
        cc = config.cc
        key = hashlib.sha256(_source_text(self.source) + repr((cc, _FLAGS, _cpu_identity())).encode()).hexdigest()
        stem = self.source.stem.removesuffix("_kernel")
        target = config.cache / "kernels" / f"{stem}-{key[:16]}.so"
        what = f"the {stem} kernel"
        try:
            lib = None
            if target.exists():
                try:
                    lib = ctypes.CDLL(str(target))
                except OSError:  # a damaged cache entry (say, from a full disk): build it again
                    target.unlink()
            if lib is None:
                if cc is None:
                    raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
                _compile(cc, self.source, target)
                lib = ctypes.CDLL(str(target))
        except RuntimeError as e:  # from the compiler
            warnings.warn(f"loratune: {what} could not be built ({e}); training still works, {self.without}. "
                          "Fix: install a C compiler (e.g. `apt install gcc`) or set $CC.", RuntimeWarning,
                          stacklevel=4)
            return None
        except OSError as e:  # from the cache directory
            warnings.warn(f"loratune: {what} could not be cached or loaded ({e}); training still works, "
                          f"{self.without}. Fix: point $LORATUNE_CACHE at a writable directory (now "
                          f"{target.parent.parent}).", RuntimeWarning, stacklevel=4)
            return None
        self.threads_ok = _one_openmp_runtime()
        self.declare(lib)
        return lib
