"""Small C kernels compiled on first use with the system's C compiler, cached per machine, loaded with ctypes.

A kernel is a C file shipped in the package, with the local headers it includes. It is built with
``-march=native`` and OpenMP where those work (flags tried in order), written to
``$LORATUNE_CACHE/kernels/<stem>-<hash>.so`` atomically (temp file + rename), the hash covering the source and its
headers, the compiler and its version (the first line of ``cc --version``), the flags and the CPU.

Loading a shared library runs its code, so a cached one is loaded only where it is known to be loratune's own
build: each build's SHA-256 is recorded in ``$LORATUNE_CACHE/kernel-manifest/<library>.sha256`` (written
atomically, after the library), and a library is loaded only where its bytes hash to that entry, and where both
directories, the entry and the library belong to this user and no one else may write them. A library that is
missing, unrecorded, or does not match (cut short by a full disk, planted under the predicted name) is built
again, once; a directory or entry that others could write is refused with one warning. Every caller has a
pure-torch or numpy path, so where no compiler works, or the build cannot be loaded, a kernel is ``None`` with one
warning, and ``LORATUNE_NATIVE=0`` forces that.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import platform
import re
import stat
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ... import settings
from ...fsutil import atomic_write

_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-Wno-unknown-pragmas"])
MANIFEST_DIR = "kernel-manifest"  # beside the kernels directory: that one holds nothing but the libraries


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


def compiler_version(cc: str) -> str:
    """The first line ``cc --version`` prints: part of the cache key, so an upgraded compiler builds afresh."""
    try:
        res = subprocess.run([cc, "--version"], capture_output=True, text=True, errors="replace", timeout=60)
    except (OSError, subprocess.SubprocessError) as e:  # no such compiler, or it hung
        raise RuntimeError(f"{cc}: {e}") from None
    lines = (res.stdout.strip() or res.stderr.strip()).splitlines()
    return lines[0].strip() if lines else f"(no version printed, exit status {res.returncode})"


def library_path(source: Path, cc: str) -> Path:
    """Where the library that ``cc`` builds from ``source`` is cached (under ``settings.cache``); its name holds a
    hash of the source and its headers, the compiler and its version, the flags and the CPU."""
    what = repr((cc, compiler_version(cc), _FLAGS, _cpu_identity())).encode()
    key = hashlib.sha256(_source_text(source) + what).hexdigest()
    return settings.get().cache / "kernels" / f"{source.stem.removesuffix('_kernel')}-{key[:16]}.so"


def manifest_path(library: Path) -> Path:
    """The manifest entry that records the SHA-256 of ``library`` (a file of the ``sha256sum`` format)."""
    return library.parent.parent / MANIFEST_DIR / f"{library.name}.sha256"


def _sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _BuildFailed(Exception):
    """The compiler ran and refused these flags: the next set may work."""


class _Untrusted(Exception):
    """A cache directory or manifest entry that another user owns or may write: nothing in it is loaded.
    ``args``: (what is wrong, how to fix it)."""


def _compile(cc: str, source: Path, target: Path) -> str:
    """Compile ``source`` to ``target`` atomically (``fsutil.atomic_write``), with -march=native and OpenMP where
    they work; the SHA-256 of what was built."""
    errors, digest = [], []
    for flags in _FLAGS:
        def build(tmp: str, flags: list[str] = flags) -> None:
            cmd = [cc, *flags, "-std=c99", "-shared", "-fPIC", str(source), "-o", tmp, "-lm"]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:  # no such compiler, or it hung: other flags won't help
                raise RuntimeError(f"{cc}: {e}") from None
            if res.returncode != 0:
                raise _BuildFailed(res.stderr.strip()[-500:] or f"{cc} exited with status {res.returncode}")
            digest.append(_sha256(tmp))

        try:
            atomic_write(target, build, mode=0o755)
            return digest[-1]
        except _BuildFailed as e:
            errors.append(str(e))
    raise RuntimeError("; ".join(errors))


def _private(path: Path, st: os.stat_result) -> bool:
    """Whether ``path`` (stat ``st``) belongs to this user and no one else may write it."""
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _refusal(path: Path, st: os.stat_result) -> _Untrusted:
    """Why ``path`` is not private, and the fix."""
    if st.st_uid != os.getuid():
        return _Untrusted(f"{path} belongs to another user (uid {st.st_uid}; this is uid {os.getuid()})",
                          "remove it (loratune makes it again) or point $LORATUNE_CACHE at a directory of yours")
    who = "everyone" if st.st_mode & stat.S_IWOTH else "its group"
    return _Untrusted(f"{path} may be written by {who} (mode {stat.S_IMODE(st.st_mode):o})",
                      f"`chmod go-w {path}`, or point $LORATUNE_CACHE at a directory only you can write")


def _private_dir(path: Path) -> None:
    """Make the directory ``path`` (mode 755 at most) where it is missing; _Untrusted where it is not private."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = path.stat()
    if not _private(path, st):
        raise _refusal(path, st)


def _recorded(manifest: Path) -> str | None:
    """The SHA-256 that the manifest entry records; None where there is none (or it is not a digest)."""
    try:
        st = manifest.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _Untrusted(f"{manifest} is not a regular file", "remove it (loratune writes it again)")
    if not _private(manifest, st):
        raise _refusal(manifest, st)
    words = manifest.read_text(encoding="ascii", errors="replace").split()
    return words[0] if words and re.fullmatch(r"[0-9a-f]{64}", words[0]) else None


def _matches(library: Path, digest: str | None) -> bool:
    """Whether ``library`` is a private regular file whose bytes hash to ``digest``."""
    if digest is None:
        return False
    try:
        st = library.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and _private(library, st) and _sha256(library) == digest


def _dlopen(library: Path) -> ctypes.CDLL:
    """Load a shared library (its constructors run): only ever called on a file that ``_matches`` its entry."""
    return ctypes.CDLL(str(library))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (flock), so that processes check, build and record one at a time."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: each step is still atomic and checked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _LoadFailed(Exception):
    """A fresh build, recorded and matching, that the dynamic loader refused."""


def _open(source: Path, cc: str) -> ctypes.CDLL:
    """The library built from ``source``: the cached one where it matches its manifest entry and loads, else a new
    build (recorded, checked, then loaded). _Untrusted, _LoadFailed, RuntimeError (compiler) or OSError (cache)."""
    target = library_path(source, cc)
    manifest = manifest_path(target)
    _private_dir(target.parent)
    _private_dir(manifest.parent)
    with _locked(target.parent):
        if _matches(target, _recorded(manifest)):
            with contextlib.suppress(OSError):  # intact, yet refused (say, a library it needs went away): rebuild
                return _dlopen(target)
        # missing, unrecorded, not matching (cut short, planted), or refused by the loader: build it again, once
        digest = _compile(cc, source, target)
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(f"{digest}  {target.name}\n"), mode=0o644)
        if not _matches(target, _recorded(manifest)):
            raise _LoadFailed(f"{target} changed while it was being built")
        try:
            return _dlopen(target)
        except OSError as e:
            raise _LoadFailed(str(e)) from None


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
        what = f"the {self.source.stem.removesuffix('_kernel')} kernel"
        cache = config.cache
        try:
            if config.cc is None:
                raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
            lib = _open(self.source, config.cc)
        except RuntimeError as e:  # from the compiler
            warnings.warn(f"loratune: {what} could not be built ({e}); training still works, {self.without}. "
                          "Fix: install a C compiler (e.g. `apt install gcc`) or set $CC.", RuntimeWarning,
                          stacklevel=4)
            return None
        except _Untrusted as e:  # nothing there is loaded: a library in it could be anyone's
            problem, fix = e.args
            warnings.warn(f"loratune: {what} is not loaded from the cache: {problem}, so a library there could be "
                          f"someone else's; training still works, {self.without}. Fix: {fix}.", RuntimeWarning,
                          stacklevel=4)
            return None
        except _LoadFailed as e:
            warnings.warn(f"loratune: {what} was built but could not be loaded ({e}); training still works, "
                          f"{self.without}. Fix: check the compiler's installation (its OpenMP runtime, libgomp), "
                          "or set LORATUNE_NATIVE=0 to skip the kernels.", RuntimeWarning, stacklevel=4)
            return None
        except OSError as e:  # from the cache directory
            warnings.warn(f"loratune: {what} could not be cached or loaded ({e}); training still works, "
                          f"{self.without}. Fix: point $LORATUNE_CACHE at a writable directory (now "
                          f"{cache}).", RuntimeWarning, stacklevel=4)
            return None
        self.threads_ok = _one_openmp_runtime()
        self.declare(lib)
        return lib

