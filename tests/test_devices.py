"""Device and dtype resolution (loratune.devices): auto, explicit, and what this machine lacks, with torch's CUDA and
MPS probes patched so that every case runs on a CPU-only machine."""

from __future__ import annotations

import pytest
import torch

from loratune import devices
from loratune.devices import DeviceError, resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n, bf16=True)``: pretend this machine has ``n`` CUDA GPUs (0: none) and no MPS."""
    def pretend(n: int, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Old GPU")
        monkeypatch.setattr(devices, "_mps_available", lambda: False)
    return pretend


def test_auto_is_the_first_gpu_or_the_cpu(gpus):
    gpus(0)
    assert resolve_device("auto") == CPU and resolve_device(None) == CPU
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # torchrun: the local rank's GPU
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)


def test_explicit_devices(gpus):
    gpus(2)
    assert resolve_device("cpu") == CPU
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_auto_takes_mps_where_there_is_no_gpu(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("n, spec, message", [
    (0, "cuda", r"train.device=cuda but this machine has no CUDA GPU .*available: cpu;.*set train.device=cpu or auto"),
    (0, "cuda:0", r"train.device=cuda:0 but this machine has no CUDA GPU .*available: cpu;"),
    (2, "cuda:3", r"train.device=cuda:3: there is no cuda:3 on this machine, it has 2 GPUs \(cpu, cuda:0, cuda:1\); "
                  r"use cuda:0 to cuda:1"),
    (0, "mps", r"train.device=mps but this machine has no Apple MPS device \(available: cpu\)"),
    (0, "gpu", r"train.device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
    (0, "cuda:x", r"train.device must be one of auto, cpu, cuda, cuda:N, mps, got 'cuda:x'"),
])
def test_unavailable_or_unknown_devices_are_one_line_errors(gpus, n, spec, message):
    gpus(n)
    with pytest.raises(DeviceError, match=message) as e:
        resolve_device(spec, key="train.device")
    assert "\n" not in str(e.value)


def test_dtype_auto_follows_the_device(gpus, monkeypatch):
    gpus(1)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    gpus(1, bf16=False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float32
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert resolve_dtype(None, CPU) == torch.float32  # a CPU without fast bf16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float32


def test_explicit_dtypes():
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype(torch.bfloat16, CPU) == torch.bfloat16
    assert resolve_dtype(torch.float64, CPU) == torch.float64  # the Python API may ask for float64 references
    assert resolve_dtype("float16", torch.device("cuda", 0)) == torch.float16


def test_bad_dtypes_are_one_line_errors(gpus):
    with pytest.raises(DeviceError, match=r"model.dtype=float16 on the CPU: CPUs have no fast float16 products.*use "
                                          r"model.dtype=bfloat16"):
        resolve_dtype("float16", CPU, key="model.dtype")
    with pytest.raises(DeviceError, match=r"--dtype must be one of auto, float32, bfloat16, float16, got 'bf16' "
                                          r"\(did you mean bfloat16\?\)"):
        resolve_dtype("bf16", CPU, key="--dtype")
    with pytest.raises(DeviceError, match="got 'int8'"):
        resolve_dtype("int8", CPU)
    with pytest.raises(DeviceError, match="not a floating-point dtype"):
        resolve_dtype(torch.int8, CPU)
    gpus(1, bf16=False)
    with pytest.raises(DeviceError, match="model.dtype=bfloat16 but Old GPU has no bfloat16 support"):
        resolve_dtype("bfloat16", torch.device("cuda", 0), key="model.dtype")


def test_cpu_flags_are_read_from_the_machine():
    flags = devices.cpu_flags()
    assert isinstance(flags, frozenset)
    assert devices.bf16_is_fast(CPU) == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_to_device_and_model_device():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert devices.to_device(batch, CPU) is batch
    assert devices.model_device(torch.nn.Linear(2, 2)) == CPU
