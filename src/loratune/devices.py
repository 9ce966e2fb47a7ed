"""Where a model runs and in what precision: ``device`` (auto, cpu, cuda, cuda:N, mps) and ``dtype`` (auto, float32,
bfloat16, float16), resolved to a ``torch.device`` and a ``torch.dtype`` with one-line errors for what this machine
cannot do.

* device ``auto``: the first GPU if there is one (under torchrun: the GPU of the process's local rank), else Apple's
  MPS if present, else the CPU. ``cuda`` is the same GPU as ``auto`` but refuses a machine without one; ``cuda:N``
  refuses a machine with N GPUs or fewer.
* dtype ``auto``: bfloat16 on a CUDA GPU that supports it and on a CPU with fast bfloat16 arithmetic (the
  AVX512-BF16 or AMX-BF16 instructions), float32 anywhere else. ``float16`` on a CPU is refused: CPUs have no fast
  float16 products, and float16 training needs loss scaling that bfloat16 does not.

Adapters stay float32 on a half-precision base (``adapters.layers``) and the loss is computed in float32
(``ops.losses``); only the frozen base weights and the activations take ``dtype``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32",
            "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class DeviceError(ConfigError):
    """A device or dtype that is unknown, or that this machine does not have."""


def check_dtype_name(name: str, key: str = "dtype") -> str:
    """``name`` if it is one of auto/float32/bfloat16/float16; a DeviceError naming the valid ones otherwise."""
    if isinstance(name, str) and name in DTYPE_CHOICES:
        return name
    hint = f" (did you mean {_ALIASES[str(name).lower()]}?)" if str(name).lower() in _ALIASES else ""
    raise DeviceError(f"{key} must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}{hint}")


def check_device_name(name: str, key: str = "device") -> str:
    """``name`` if it reads as a device (auto, cpu, cuda, cuda:N, mps); whether this machine has it is checked by
    ``resolve_device``."""
    text = str(name)
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return text
    raise DeviceError(f"{key} must be one of {DEVICE_CHOICES}, got {name!r} (e.g. {key}=cuda:0)")


def available() -> str:
    """What this machine offers, in words: 'cpu, cuda:0, cuda:1' (for error messages)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return ", ".join(found)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None,
                   key: str = "device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine.

    ``local_rank`` (under torchrun) picks the GPU for ``auto`` and ``cuda``: one GPU per process. A device this
    machine does not have is a DeviceError that says what it has.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = check_device_name("auto" if spec is None else spec, key)
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DeviceError(f"{key}=mps but this machine has no Apple MPS device (available: {available()}); set "
                              f"{key}=auto or cpu")
        return torch.device("mps")
    has_cuda = torch.cuda.is_available()
    if text == "auto":
        if has_cuda:
            return torch.device("cuda", (local_rank or 0) % max(1, torch.cuda.device_count()))
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if not has_cuda:
        raise DeviceError(f"{key}={text} but this machine has no CUDA GPU that torch can use (available: "
                          f"{available()}; torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); set "
                          f"{key}=cpu or auto")
    count = torch.cuda.device_count()
    index = (local_rank or 0) if text == "cuda" else int(text.partition(":")[2])
    if index >= count:
        what = f"local rank {index}" if text == "cuda" else text
        raise DeviceError(f"{key}={text}: there is no {what} on this machine, it has {count} GPU"
                          f"{'s' if count != 1 else ''} ({available()}); use cuda:0 to cuda:{count - 1}, or "
                          f"{key}=cuda")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, key: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` that ``spec`` (a name, a dtype, or None/'auto') means on ``device``."""
    if isinstance(spec, torch.dtype):
        if not spec.is_floating_point:
            raise DeviceError(f"{key}={spec} is not a floating-point dtype; use one of {', '.join(DTYPES)}")
        if spec not in DTYPES.values():
            return spec  # float64 (references in tests) and the like, from the Python API
        name = str(spec).removeprefix("torch.")
    else:
        name = check_dtype_name("auto" if spec is None else spec, key)
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if name == "float16" and device.type == "cpu":
        raise DeviceError(f"{key}=float16 on the CPU: CPUs have no fast float16 products, and float16 training needs "
                          f"loss scaling; use {key}=bfloat16 (same memory, the range of float32) or float32")
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{key}=bfloat16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; use "
                          f"{key}=float32 (or float16)")
    return DTYPES[name]


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 is the better choice on ``device``: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX-BF16 (``dtype: auto`` picks bfloat16 there)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch``'s tensors on ``device`` (the same dict where they already are)."""
    if all(v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
