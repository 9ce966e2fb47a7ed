"""Shared helpers for the compose tests: tiny models with random (non-zero) adapters, the same adapters in PEFT,
and per-module ΔW from either side."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from loratune import LoraConfig, LoraModel, get_lora_model
from loratune.compose import Adapter, adapter_from_model, delta_weights


def randomize(lm: LoraModel, name: str, seed: int, scale: float = 0.2) -> None:
    """Give every LoRA factor of adapter ``name`` random values (B is zero after the usual init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            if name in layer.adapters:
                ad = layer.adapters[name]
                ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=g) * scale)
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * scale)


def model_with(base: torch.nn.Module, configs: dict[str, LoraConfig], seed: int = 0) -> LoraModel:
    """``base`` (deep-copied) with one random adapter per config, in order."""
    names = list(configs)
    lm = get_lora_model(copy.deepcopy(base), configs[names[0]], names[0])
    for n in names[1:]:
        lm.add_adapter(n, configs[n])
    for i, n in enumerate(names):
        randomize(lm, n, seed + i)
    return lm


def adapters_of(lm: LoraModel, names: list[str]) -> list[Adapter]:
    return [adapter_from_model(lm, n) for n in names]


def peft_with(base: torch.nn.Module, lm: LoraModel, names: list[str], tmp: Path):
    """PEFT's LoraModel holding the same adapters (saved by loratune, loaded by PEFT)."""
    import peft

    dirs = {}
    for n in names:
        d = tmp / f"saved-{n}"
        lm.save_pretrained(d, selected_adapters=[n])
        dirs[n] = d if n == "default" else d / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(dirs[n], adapter_name=n)
    return pm


def peft_deltas(pm, name: str) -> dict[str, torch.Tensor]:
    """Module path -> PEFT's ΔW for adapter ``name`` (float64)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, m in pm.base_model.model.named_modules():
        if isinstance(m, LoraLayer) and (name in m.lora_A or name in m.lora_embedding_A):
            out[path] = m.get_delta_weight(name).detach().double()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def max_rel(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))[:3]
    return max(rel(ours[k], ref[k]) for k in ref)


def deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return delta_weights(adapter)
