"""loratune.settings: every switch read from the environment in one place, typed, overridable in code."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratune import settings


@pytest.mark.parametrize("value, want", [("1", True), ("on", True), ("true", True), ("yes", True), ("0", False),
                                         ("off", False), ("false", False), ("no", False), ("", None),
                                         ("auto", None)])
def test_loratune_onednn_values(value, want):
    assert settings.from_environment({"LORATUNE_ONEDNN": value}).onednn is want


def test_a_value_not_understood_warns_and_keeps_the_default():
    with pytest.warns(UserWarning, match="LORATUNE_FUSED='maybe' is not understood.*1 or 0"):
        assert settings.from_environment({"LORATUNE_FUSED": "maybe"}).fused is True
    with pytest.warns(UserWarning, match="WORLD_SIZE='two' is not a whole number"):
        assert settings.from_environment({"WORLD_SIZE": "two"}).world_size == 1


def test_every_switch_is_read():
    s = settings.from_environment({"LORATUNE_FUSED": "0", "LORATUNE_ONEDNN": "1", "LORATUNE_NATIVE": "off",
                                   "LORATUNE_CACHE": "~/elsewhere", "LORATUNE_DEBUG": "1", "CC": "/opt/cc",
                                   "WORLD_SIZE": "4"})
    assert (s.fused, s.onednn, s.native, s.debug, s.cc, s.world_size) == (False, True, False, True, "/opt/cc", 4)
    assert s.cache == Path("~/elsewhere").expanduser()


def test_defaults():
    s = settings.from_environment({})
    assert (s.fused, s.onednn, s.native, s.debug, s.world_size) == (True, None, True, False, 1)
    assert s.cache == Path.home() / ".cache" / "loratune"


def test_override_is_scoped_nested_and_restored():
    before = settings.get()
    with settings.override(fused=False):
        assert settings.get().fused is False
        with settings.override(native=False):
            assert (settings.get().fused, settings.get().native) == (False, False)
        assert settings.get().native is before.native
    assert settings.get() == before


def test_override_is_restored_after_an_error():
    before = settings.get()
    with pytest.raises(RuntimeError), settings.override(native=False):
        raise RuntimeError
    assert settings.get() == before


def test_an_unknown_setting_is_refused():
    with pytest.raises(TypeError, match="unknown setting"), settings.override(fast=True):
        pass


def test_nothing_else_reads_the_environment():
    """One settings module: no other module of the package reads os.environ (or os.getenv)."""
    root = Path(settings.__file__).parent
    readers = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
               if p.name != "settings.py" and ("os.environ" in p.read_text() or "getenv" in p.read_text())]
    assert readers == []
