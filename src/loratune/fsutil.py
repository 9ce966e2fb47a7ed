"""Files and directories written whole or not at all, with the modes ``open`` and ``mkdir`` would give them.

Every write of a file loratune makes goes through ``atomic_write`` (a temp file beside the target, flushed to disk,
renamed over it) and every directory it produces as a unit (a checkpoint, an adapter, a merged model, a converted
model) through ``atomic_dir`` (a temp directory beside the target, renamed into place), so a reader or a crash never
sees half of one. Tensors are read and written with safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFileError, LoraTuneError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (a directory: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], Any], mode: int = 0o666) -> None:
    """Write through ``write(tmp_path)``, flush it to disk, then rename it over ``path``: readers never see half a
    file, and a crash leaves the old file or the new one. The file gets ``mode`` less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode & ~_umask())  # mkstemp makes 0600 files
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """``path.write_text(text)``, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_json(obj: Any, path: str | Path) -> None:
    """``obj`` as indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def public_modes(root: Path) -> None:
    """Give a tree written under ``tempfile.mkdtemp`` (0700; some writers make 0600 files) the modes ``mkdir`` and
    ``open`` would have given it, so another user or a serving process can read what loratune wrote."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in Path(root).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def writable_place(path: str | Path) -> str | None:
    """Why ``path`` (a file or directory to be made) cannot be written, or None where it can: its nearest existing
    ancestor must be a directory in which a file can really be made (probed with a temp file, removed at once, so
    read-only and special file systems such as /proc are caught too)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file"
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".loratune-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or e})"
    return None


def _sync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the directories that hold them
        if not path.is_symlink():
            _fsync(path)
    _fsync(root)


@contextlib.contextmanager
def atomic_dir(target: str | Path, exists: str = "replace") -> Iterator[Path]:
    """Yield a new empty directory beside ``target`` to fill; on a normal exit it gets public modes, is flushed to
    disk and renamed to ``target``. On an exception it is removed and ``target`` is untouched.

    Where ``target`` is an empty directory, the rename replaces it. Where it holds something: ``exists="replace"``
    moves the old one aside, renames the new one in, then removes the old one (so ``target`` is never missing or
    half-written); ``"keep"`` keeps the existing one (another process finished the same work first) and discards the
    new one. Only a directory that loratune wrote should be replaced: callers decide that before they call this.
    """
    if exists not in ("replace", "keep"):
        raise ValueError(f"exists must be 'replace' or 'keep', got {exists!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        public_modes(tmp)
        _sync_tree(tmp)
        try:
            tmp.rename(target)  # where target is missing, or an empty directory (which rename replaces)
            tmp = None
        except OSError:
            if not target.exists():
                raise
        if tmp is not None and exists == "replace":
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            target.rename(old / "d")
            tmp.rename(target)
            tmp = None
            shutil.rmtree(old, ignore_errors=True)
        _fsync(target.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``tensors`` (copied to contiguous CPU tensors first), atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a damaged one is an AdapterFileError, never a crash deep in Rust."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path} is not a valid safetensors file ({e}); re-save or re-copy it") from None


def check_out_dir(out: Path, marker: str, writer: str, overwrite: bool = False, keep: tuple[Path, ...] = (),
                  example: str = "out/", parent_must_exist: bool = False,
                  error: type[LoraTuneError] = LoraTuneError) -> None:
    """Refuse, before any work, an output directory ``out`` that a command (``writer``, e.g. "loratune merge") must
    not write: a file; the working directory or one of ``keep`` (its inputs), or a directory above them; an unwritable
    place; a missing parent (where ``parent_must_exist``); a non-empty directory without the command's ``marker``
    file, i.e. one it did not write (unless ``overwrite``). Each as one ``error`` line naming the fix."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file; give a directory (new, empty, or one {writer} wrote)")
    resolved = out.resolve()
    for inner in (Path.cwd(), *keep):
        inner = inner.resolve()
        if resolved == inner or resolved in inner.parents:
            raise error(f"--out {out} is or holds {inner}, which must not be replaced; give a new directory such "
                        f"as {example}")
    if parent_must_exist and not out.parent.is_dir():
        raise error(f"--out {out}: the directory {out.parent} does not exist; create it first")
    problem = writable_place(out)
    if problem:
        raise error(f"--out {out} cannot be written ({problem}); choose a directory you can write to")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file() and not overwrite:
        raise error(f"--out {out} is not empty and was not written by {writer}; give a new or empty directory, or "
                    "pass --overwrite to replace it (its contents are then deleted)")
