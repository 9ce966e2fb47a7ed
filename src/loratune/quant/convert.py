"""Whole models: quantize every eligible Linear to NF4 in place, undo it, and describe how a model was quantized.

``quantize_model`` replaces each plain ``nn.Linear`` except the skipped ones by an ``NF4Linear``, one layer at a
time: each layer's fp32 weight is dropped as soon as its NF4 copy exists, so quantizing needs about one layer's
temporaries above the model (measured in docs/qlora.md). The default skip list is transformers' for its
bitsandbytes quantizer (``get_keys_to_not_convert``): the output head, tied weights and the module of the last
parameter (a classifier); embeddings and norms are not Linears and stay as they are.

``dequantize_model`` puts plain Linears holding the dequantized weights back (what an adapter trained on the 4-bit
base saw): the full-precision copy a QLoRA adapter merges into. ``quantization_settings`` / ``check_same_settings``
record and compare the settings, so that an adapter is loaded onto the base it was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError
from .linear import NF4Linear, check_compute_dtype
from .nf4 import BLOCKSIZES

QUANTIZE_CHOICES = ("nf4",)


def check_quantize(value: str | None) -> str | None:
    """``value`` as a quantize setting: "nf4", or None for none ("none"/"" too); a ConfigError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() in QUANTIZE_CHOICES:
        return value.strip().lower()
    raise ConfigError(f"quantize={value!r} is not supported; use 'nf4' (4-bit NormalFloat with double-quantized "
                      "scales, as bitsandbytes/QLoRA) or leave it unset for full precision")


def default_skip_modules(model: nn.Module) -> list[str]:
    """The modules transformers' bitsandbytes quantizer leaves in full precision by default: the output head, tied
    weights and the last parameter's module."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # older transformers keep it elsewhere
        from transformers.integrations.bitsandbytes import get_keys_to_not_convert
    try:
        return sorted(get_keys_to_not_convert(model))
    except (AttributeError, IndexError):  # not a transformers model: its output embeddings, if it says
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n, m in model.named_modules() if head is not None and m is head]


def skipped(name: str, patterns: list[str]) -> bool:
    """Whether module ``name`` or a module it sits in matches a skip pattern, each matched as transformers matches
    them: from the start up to a module boundary (a regex allowed), or as a suffix. (So "mlp" skips every linear
    inside each ``...mlp`` module, where transformers would skip only a module whose own name ends in "mlp".)"""
    parts = name.split(".")
    scopes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", n) or n.endswith(p) for p in patterns for n in scopes)


def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.float32, skip_modules: list[str] | None = None,
                   blocksize: int = 64, double_quant: bool = True,
                   load_weight: Callable[[str], torch.Tensor] | None = None) -> nn.Module:
    """Replace every eligible ``nn.Linear`` of ``model`` by an ``NF4Linear``, in place, layer by layer; returns
    ``model``. ``skip_modules`` (names or patterns, see ``skipped``) adds to the default skips
    (``default_skip_modules``); the rest of the model (embeddings, norms, skipped linears) is left as it is.

    ``load_weight(name)``, where given, supplies the full-precision weight of linear ``name`` (``load.py`` reads it
    from the checkpoint for a model whose linears are still on the meta device): it is quantized and dropped at
    once, so a model is loaded and quantized with one layer's full-precision weight alive at a time."""
    check_compute_dtype(compute_dtype)
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"NF4 blocksize {blocksize!r} is not supported; use one of "
                          f"{', '.join(map(str, BLOCKSIZES))} (bitsandbytes' sizes; 64 is QLoRA's)")
    names = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for name, module in names.items():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    skip_record = sorted(set([skip_modules] if isinstance(skip_modules, str) else skip_modules or []))
    for name in linears_to_quantize(model, skip_modules):
        linear = model.get_submodule(name)
        shared = [o for o in owners[id(linear.weight)] if o != f"{name}.weight"]
        if shared:
            raise ConfigError(f"cannot quantize '{name}': its weight is tied to '{shared[0]}', which would keep it in "
                              f"full precision anyway; add '{name}' to quantize_skip_modules")
        if load_weight is not None:
            linear.weight = nn.Parameter(load_weight(name), requires_grad=False)
        layer = NF4Linear.from_linear(linear, compute_dtype, blocksize, double_quant)
        layer.skip_modules = skip_record  # what it was quantized with, for quantization_settings
        model.set_submodule(name, layer)
        linear.weight = None  # this layer's full-precision weight goes now, not when the model is done
        del linear
    return model


def linears_to_quantize(model: nn.Module, skip_modules: list[str] | str | None = None) -> list[str]:
    """The names of the linears ``quantize_model`` replaces: every plain ``nn.Linear`` not skipped by default or by
    ``skip_modules`` (each entry must match a module of ``model``: a typo is an error, not a silent no-op)."""
    if isinstance(skip_modules, str):
        skip_modules = [skip_modules]
    names = dict(model.named_modules())
    for pattern in skip_modules or []:
        if not isinstance(pattern, str) or not any(skipped(n, [pattern]) for n in names if n):
            raise ConfigError(f"quantize_skip_modules entry {pattern!r} matches no module of {type(model).__name__}; "
                              "give module names it has (e.g. 'lm_head' or 'model.layers.0.mlp')")
    patterns = default_skip_modules(model) + list(skip_modules or [])
    return [n for n, m in names.items() if n and type(m) is nn.Linear and not skipped(n, patterns)]


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every ``NF4Linear`` of ``model`` (inside LoRA layers too) by a plain ``nn.Linear`` holding its
    dequantized weight in ``dtype``, in place; returns ``model``. Merging a QLoRA adapter into this gives the model it
    was trained to be."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            model.set_submodule(name, module.dequantized_linear(dtype))
    return model


def quantization_settings(model: nn.Module) -> dict | None:
    """How ``model``'s linears are quantized, as JSON-ready settings (None if none is): what an adapter's metadata
    records so that the same 4-bit base can be rebuilt and checked."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    if not layers:
        return None
    kinds = {(m.blocksize, m.double_quant, str(m.compute_dtype).removeprefix("torch."),
              tuple(getattr(m, "skip_modules", ()))) for m in layers.values()}
    if len(kinds) > 1:
        raise ConfigError(f"the model's NF4 layers use {len(kinds)} different settings {sorted(kinds)}; quantize it "
                          "in one quantize_model call")
    blocksize, double_quant, compute, skip = kinds.pop()
    return {"quantize": "nf4", "blocksize": blocksize, "double_quant": double_quant, "compute_dtype": compute,
            "quantize_skip_modules": list(skip), "quantized_modules": len(layers)}


def check_same_settings(recorded: dict | None, current: dict | None, source: str) -> None:
    """An AdapterFileError naming what differs when an adapter trained on a base quantized as ``recorded`` is loaded
    onto a base quantized as ``current`` (either None: not quantized)."""
    recorded, current = recorded or {"quantize": None}, current or {"quantize": None}
    keys = ("quantize", "blocksize", "double_quant", "compute_dtype", "quantize_skip_modules", "quantized_modules")
    diff = [f"{k} {recorded.get(k)!r} (now {current.get(k)!r})" for k in keys
            if recorded.get(k) != current.get(k) and (k == "quantize" or recorded.get("quantize"))]
    if diff:
        raise AdapterFileError(f"the adapter in {source} was trained on a base quantized with other settings: "
                               f"{'; '.join(diff)}; load the base with the adapter's settings")


def check_skip_vs_targets(skip_modules: list[str] | None, target_modules: list[str] | str | None) -> None:
    """A ConfigError if a module is named both in LoRA's ``target_modules`` and in ``quantize_skip_modules``."""
    if not skip_modules or not isinstance(target_modules, list):
        return
    both = sorted(set(skip_modules) & set(target_modules))
    if both:
        raise ConfigError(f"{both} listed both in target_modules and in quantize_skip_modules; remove them from one "
                          "(skipped modules stay full precision, targets get adapters on the 4-bit base)")
