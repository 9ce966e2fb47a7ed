"""loratune.fsutil: files and directories written whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from loratune import fsutil
from loratune.errors import AdapterFileError


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    fsutil.write_text(path, "one")
    fsutil.write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["f.txt"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    fsutil.write_text(path, "old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_dir_appears_whole_with_public_modes(tmp_path):
    target = tmp_path / "out"
    with fsutil.atomic_dir(target) as tmp:
        assert not target.exists()
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["out"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()


def test_atomic_dir_replaces_or_keeps_an_existing_one(tmp_path):
    target = tmp_path / "out"
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "old").write_text("1")
    with fsutil.atomic_dir(target, exists="keep") as tmp:
        (tmp / "new").write_text("2")
    assert os.listdir(target) == ["old"]
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "new").write_text("2")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["out"]


def test_atomic_dir_failure_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "out"
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "old").write_text("1")
    with pytest.raises(RuntimeError), fsutil.atomic_dir(target) as tmp:
        (tmp / "new").write_text("2")
        raise RuntimeError("killed")
    assert os.listdir(target) == ["old"] and os.listdir(tmp_path) == ["out"]


def test_tensors_round_trip_and_a_damaged_file_is_one_error(tmp_path):
    path = tmp_path / "t.safetensors"
    fsutil.save_tensors({"a": torch.arange(6.0).view(2, 3).t()}, path)  # non-contiguous: copied
    assert torch.equal(fsutil.read_tensors(path)["a"], torch.arange(6.0).view(2, 3).t())
    path.write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        fsutil.read_tensors(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_writes_are_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    """Durability: the file (and a directory's files and the directory) reach the disk before they get their
    name, so a crash cannot leave a named but empty checkpoint or adapter."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, type(tmp_path).rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b))) or real_replace(a, b))
    monkeypatch.setattr(type(tmp_path), "rename",
                        lambda self, target: events.append(("rename", str(target))) or real_rename(self, target))
    fsutil.write_text(tmp_path / "f.txt", "x")
    with fsutil.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("1")
    names = [e for e in events if e[0] == "rename"]
    assert names == [("rename", str(tmp_path / "f.txt")), ("rename", str(tmp_path / "d"))]
    first_rename = events.index(names[0])
    assert any(kind == "fsync" and ".f.txt." in path for kind, path in events[:first_rename])
    second = events.index(names[1])
    synced = [path for kind, path in events[first_rename:second] if kind == "fsync"]
    assert any(p.endswith("/a") for p in synced) and any(".d.tmp-" in p and not p.endswith("/a") for p in synced)
    assert events[-1][0] == "fsync"  # and the parent directory after the rename


def test_check_out_dir_refuses_what_the_command_must_not_write(tmp_path, monkeypatch):
    from loratune.errors import LoraTuneError
    from loratune.fsutil import check_out_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / ".marker").write_text("{}")
    (tmp_path / "mine" / "old.bin").write_text("old")
    (tmp_path / "inputs" / "adapter").mkdir(parents=True)
    cases = [(tmp_path / "afile", {}, "is a file"), (tmp_path, {}, "is or holds"),
             (tmp_path / "inputs", {"keep": (tmp_path / "inputs" / "adapter",)}, "is or holds"),
             (tmp_path / "no" / "such" / "out", {"parent_must_exist": True}, "does not exist; create it first"),
             (tmp_path / "theirs", {}, "was not written by loratune test")]
    for out, kw, said in cases:
        with pytest.raises(LoraTuneError, match=said) as e:
            check_out_dir(out, ".marker", "loratune test", **kw)
        assert "\n" not in str(e.value)
    check_out_dir(tmp_path / "mine", ".marker", "loratune test")  # its own earlier output: allowed
    check_out_dir(tmp_path / "theirs", ".marker", "loratune test", overwrite=True)
    check_out_dir(tmp_path / "no" / "such" / "out", ".marker", "loratune test")  # parents made by the writer
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"  # checking never deletes
