"""The kernel cache: a library is loaded only where it is loratune's own build (its SHA-256 in the manifest, in
directories only this user may write); a damaged or planted file is built again, an open cache is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from loratune import settings
from loratune.ops import dropout
from loratune.ops.cpu import build

SOURCE = dropout._KERNEL_SOURCE


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recorded(library: Path) -> str:
    return build.manifest_path(library).read_text().split()[0]


def kernel() -> build.Kernel:
    """A fresh handle on the dropout kernel's source (not tried yet); ``declare`` needs its symbols."""
    return build.Kernel(SOURCE, lambda lib: lib.lt_dropout_f32, without="with the test's fallback")


def runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.fixture
def cc() -> str:
    if settings.get().cc is None:
        pytest.skip("no C compiler on this machine")
    return settings.get().cc


@pytest.fixture
def loads(monkeypatch):
    """Every library the cache asks the loader for, with its digest then; a file that does not match its manifest
    entry is refused here instead of loaded (loading a cut-short library can crash the process)."""
    seen: list[tuple[Path, str, str | None]] = []
    real = build._dlopen

    def spy(path):
        entry = build.manifest_path(Path(path))
        seen.append((Path(path), sha(path), entry.read_text().split()[0] if entry.is_file() else None))
        if seen[-1][1] != seen[-1][2]:
            raise OSError("the test refused to load a library that does not match its manifest entry")
        return real(path)

    monkeypatch.setattr(build, "_dlopen", spy)
    return seen


@pytest.fixture
def compiles(monkeypatch):
    """The builds the cache runs (it really compiles)."""
    calls: list[Path] = []
    real = build._compile
    monkeypatch.setattr(build, "_compile", lambda cc, src, target: calls.append(target) or real(cc, src, target))
    return calls


def test_a_build_is_recorded_and_the_next_process_loads_it_without_building(cc, tmp_path, configure, loads,
                                                                           monkeypatch):
    configure(cache=tmp_path)
    assert kernel().get() is not None
    (library,) = (tmp_path / "kernels").iterdir()  # the kernels directory holds the libraries only
    assert library == build.library_path(SOURCE, cc)
    entry = build.manifest_path(library)
    assert entry.parent == tmp_path / build.MANIFEST_DIR
    assert entry.read_text() == f"{sha(library)}  {library.name}\n"  # the sha256sum format
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("a recorded, matching library was rebuilt"))
    assert kernel().get() is not None
    assert [(p, d) for p, d, _ in loads] == [(library, sha(library))] * 2


def test_a_truncated_library_is_rebuilt_not_loaded(cc, tmp_path, configure, loads, compiles):
    configure(cache=tmp_path / "first")
    assert kernel().get() is not None
    built = build.library_path(SOURCE, cc)
    good = built.read_bytes()
    # the same entry in a second cache, cut short as by a full disk, its manifest entry intact
    configure(cache=tmp_path / "second")
    damaged = build.library_path(SOURCE, cc)
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(good[: len(good) // 2])
    build.manifest_path(damaged).parent.mkdir()
    shutil.copy(build.manifest_path(built), build.manifest_path(damaged))
    lib = kernel().get()
    assert lib is not None and lib.lt_dropout_f32 is not None
    assert compiles == [built, damaged]  # built again, once
    assert len(damaged.read_bytes()) > len(good) // 2 and sha(damaged) == recorded(damaged)
    assert all(digest == entry for _, digest, entry in loads)  # the cut-short file was never given to the loader
    assert loads[-1][0] == damaged


PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran", f); fclose(f); }
}
void lt_keep_mask(void) {}
"""


@pytest.mark.parametrize("entry", ["none", "another library's", "not a digest"])
def test_a_planted_library_is_never_loaded(cc, tmp_path, configure, entry, compiles):
    configure(cache=tmp_path / "cache")
    marker = tmp_path / "constructor-ran"
    (tmp_path / "planted.c").write_text(PLANTED)
    target = build.library_path(SOURCE, cc)  # the name loratune will look for
    target.parent.mkdir(parents=True)
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(tmp_path / "planted.c"), "-o", str(target)],
                   check=True, capture_output=True)
    planted = sha(target)
    if entry != "none":
        manifest = build.manifest_path(target)
        manifest.parent.mkdir()
        manifest.write_text(("0" * 64 if entry == "another library's" else "planted") + f"  {target.name}\n")
    lib = kernel().get()
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    assert lib is not None and lib.lt_dropout_f32 is not None  # the real kernel, built over it
    assert compiles == [target] and sha(target) != planted and sha(target) == recorded(target)


@pytest.mark.parametrize("where, mode, says", [
    ("kernels", 0o777, "may be written by everyone (mode 777)"),
    ("kernels", 0o775, "may be written by its group (mode 775)"),
    (build.MANIFEST_DIR, 0o777, "may be written by everyone (mode 777)"),
])
def test_an_open_cache_directory_warns_once_and_falls_back(tmp_path, configure, monkeypatch, loads, compiles,
                                                           where, mode, says):
    configure(cache=tmp_path)
    open_dir = tmp_path / where
    open_dir.mkdir()
    open_dir.chmod(mode)
    monkeypatch.setattr(dropout.LIBRARY, "lib", False)  # the real dropout kernel, not tried yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dropout.kernel() is None
        assert dropout.kernel() is None  # decided once
    (message,) = runtime_warnings(caught)
    assert f"{open_dir} {says}" in message and f"Fix: `chmod go-w {open_dir}`" in message
    assert "dropout kernel is not loaded from the cache" in message and "training still works" in message
    assert not loads and not compiles and not list(tmp_path.rglob("*.so"))
    assert open_dir.stat().st_mode & 0o777 == mode  # the user's directory is left as it was
    x = torch.randn(999)  # the numpy fallback draws the same bits
    assert torch.equal(dropout.apply_mask(x, 5, 0.2), x * torch.from_numpy(dropout.keep_mask_reference(999, 5, 0.2)))


def test_a_manifest_others_may_write_is_refused(cc, tmp_path, configure, loads):
    configure(cache=tmp_path / "first")
    assert kernel().get() is not None
    built = build.library_path(SOURCE, cc)
    configure(cache=tmp_path / "second")  # a copy whose entry anyone may rewrite (a new path: nothing loaded yet)
    copy = build.library_path(SOURCE, cc)
    shutil.copytree(tmp_path / "first", tmp_path / "second")
    build.manifest_path(copy).chmod(0o666)
    del loads[:]
    with pytest.warns(RuntimeWarning, match=r"kernel-manifest/dropout-\w+\.so\.sha256 may be written by everyone"):
        assert kernel().get() is None
    assert not loads and sha(copy) == sha(built)


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_directory_of_another_user_is_refused(tmp_path, configure, loads):
    configure(cache=tmp_path)
    (tmp_path / "kernels").mkdir()
    os.chown(tmp_path / "kernels", 12345, 12345)
    with pytest.warns(RuntimeWarning, match=r"kernels belongs to another user \(uid 12345; this is uid 0\)"):
        assert kernel().get() is None
    assert not loads


def test_the_cache_stays_private_under_an_open_umask(cc, tmp_path, configure, monkeypatch):
    configure(cache=tmp_path)
    old = os.umask(0o002)  # group-writable by default, as on many desktops
    try:
        assert kernel().get() is not None
    finally:
        os.umask(old)
    library = build.library_path(SOURCE, cc)
    for path in (library.parent, library, build.manifest_path(library).parent, build.manifest_path(library)):
        assert not path.stat().st_mode & 0o022, path
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("rebuilt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: its own cache is trusted
        assert kernel().get() is not None


def test_a_library_the_loader_refuses_is_rebuilt_once_then_falls_back(cc, tmp_path, configure, monkeypatch,
                                                                     compiles):
    configure(cache=tmp_path)
    assert kernel().get() is not None  # a good, recorded build
    del compiles[:]
    def refuse(path):
        raise OSError(f"{path}: cannot load")

    monkeypatch.setattr(build, "_dlopen", refuse)
    k = kernel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert k.get() is None and k.get() is None
    (message,) = runtime_warnings(caught)
    assert "was built but could not be loaded" in message and "cannot load" in message
    assert compiles == [build.library_path(SOURCE, cc)]  # one rebuild, no more


def test_the_key_changes_with_the_compiler_version(cc, tmp_path, configure):
    configure(cache=tmp_path)
    wrapper = tmp_path / "cc"

    def release(version: str) -> None:
        wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fakecc {version}"; echo more; exit 0'
                           f'; fi\nexec {cc} "$@"\n')
        wrapper.chmod(0o755)

    release("1.0")
    first = build.library_path(SOURCE, str(wrapper))
    assert build.library_path(SOURCE, str(wrapper)) == first  # stable for one compiler
    assert build.compiler_version(str(wrapper)) == "fakecc 1.0"
    release("2.0")  # the same path, upgraded
    second = build.library_path(SOURCE, str(wrapper))
    assert second != first and second.parent == first.parent
    configure(cc=str(wrapper))
    assert kernel().get() is not None and second.is_file() and not first.exists()


def test_a_compiler_that_cannot_say_its_version_is_named(tmp_path, configure):
    configure(cache=tmp_path, cc=str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        build.compiler_version(str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="no-such-cc.*install a C compiler"):
        assert kernel().get() is None
