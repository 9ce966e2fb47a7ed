"""Every switch loratune takes from the environment, read once at import, typed, in one place.

=================  ==============  ==========================  ==================================================
variable           field           values (default first)      what it does
=================  ==============  ==========================  ==================================================
``LORATUNE_FUSED``   ``fused``         1, 0                        fused LoRA linears and blocks (0: the plain
                                                               reference path and the modules' own forwards)
``LORATUNE_ONEDNN``  ``onednn``        auto, 1, 0                  CPU products on oneDNN (auto: non-Intel AVX-512
                                                               CPUs) or on torch.mm (MKL)
``LORATUNE_NATIVE``  ``native``        1, 0                        compiled C kernels (0: numpy/torch fallbacks)
``LORATUNE_CACHE``   ``cache``         ~/.cache/loratune           converted models and built kernels
``LORATUNE_DEBUG``   ``debug``         0, 1                        the CLI shows full tracebacks
``CC``               ``cc``            cc, gcc or clang on PATH    the C compiler that builds the kernels
``WORLD_SIZE``       ``world_size``    1                           set by torchrun: the number of processes
=================  ==============  ==========================  ==================================================

Booleans read 1/true/on/yes and 0/false/off/no; a value not understood warns once and the default applies.
Nothing else in loratune reads ``os.environ`` for these. Code (tests, benchmarks) changes them for a block with
``override(fused=False)``, for the whole process until the block ends. (A plain module global, not a context
variable: torch.compile traces a global read, and breaks its graph on ``ContextVar.get``.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


@dataclass(frozen=True)
class Settings:
    """loratune's switches (see the module's table). ``onednn`` None means: the CPU decides."""

    fused: bool = True
    onednn: bool | None = None
    native: bool = True
    cache: Path = Path.home() / ".cache" / "loratune"
    debug: bool = False
    cc: str | None = None
    world_size: int = 1


def _flag(env: dict[str, str], name: str, default: bool | None, meaning: str) -> bool | None:
    value = env.get(name, "").strip().lower()
    if value in ("", "auto"):
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    warnings.warn(f"{name}={value!r} is not understood, so the default applies; set it to 1 or 0 ({meaning}) or "
                  "leave it unset", stacklevel=3)
    return default


def _int(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        warnings.warn(f"{name}={value!r} is not a whole number, so {default} applies", stacklevel=3)
        return default


def from_environment(env: dict[str, str] | None = None) -> Settings:
    """The settings that ``env`` (default: ``os.environ``) asks for."""
    env = dict(os.environ if env is None else env)
    cache = env.get("LORATUNE_CACHE", "").strip()
    return Settings(
        fused=_flag(env, "LORATUNE_FUSED", True, "the fused fast path on or off"),
        onednn=_flag(env, "LORATUNE_ONEDNN", None, "oneDNN or torch.mm; unset lets the CPU decide"),
        native=_flag(env, "LORATUNE_NATIVE", True, "compiled kernels on or off"),
        cache=Path(cache).expanduser() if cache else Settings.cache,
        debug=bool(_flag(env, "LORATUNE_DEBUG", False, "full tracebacks on or off")),
        cc=env.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
        world_size=max(1, _int(env, "WORLD_SIZE", 1)),
    )


_current: Settings = from_environment()


def get() -> Settings:
    """The settings in force (the environment's, unless ``override`` changed them)."""
    return _current


def cache_dir() -> Path:
    """Where loratune keeps converted models and built kernels (``LORATUNE_CACHE``)."""
    return _current.cache


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Change some settings inside the block, e.g. ``with settings.override(fused=False):``; restored on exit."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; see loratune.settings.Settings")
    global _current
    before = _current
    _current = dataclasses.replace(before, **changes)
    try:
        yield _current
    finally:
        _current = before


def library_default(name: str, value: str) -> None:
    """Set environment variable ``name`` to ``value`` for a third-party library that reads its switches there (W&B's
    ``WANDB_SILENT``, MLflow's ``MLFLOW_ALLOW_FILE_STORE``), unless the user has set it: their value wins."""
    os.environ.setdefault(name, value)
