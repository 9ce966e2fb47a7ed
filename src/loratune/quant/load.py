"""Loading a transformers model straight into NF4, one linear at a time.

``transformers.from_pretrained`` followed by ``quantize_model`` holds the whole full-precision model before the
first linear is quantized. Here the model is built with its parameters on the meta device (buffers real, as
accelerate's ``init_empty_weights(include_buffers=False)`` does, so rotary tables and the like are computed as
usual); every tensor that stays in full precision is read from the safetensors files and put in place, and each
linear to quantize is read, quantized and dropped in turn. The peak is the 4-bit model, the full-precision rest
(embeddings, norms, the head) and one linear's weight (measured in docs/qlora.md).

Where this cannot reproduce what ``from_pretrained`` would build (the checkpoint's names differ from the model's,
as for checkpoints transformers converts while loading; or keyword arguments it alone understands), or accelerate
is not installed, the caller
falls back to ``from_pretrained`` + ``quantize_model``: ``load_quantized`` returns None before reading any weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import linears_to_quantize, quantize_model


def load_quantized(auto: Any, path: Path, shards: list[Path], dtype: torch.dtype, compute_dtype: torch.dtype,
                   skip_modules: list[str] | None, model_kwargs: dict[str, Any]) -> nn.Module | None:
    """``auto.from_pretrained(path)`` (``auto``: an ``AutoModelFor...`` class) with its linears in NF4, loaded layer
    by layer from the safetensors ``shards``; None where only ``from_pretrained`` can load it (see the module)."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # (not a loratune dependency of its own): from_pretrained + quantize_model, which peaks
        return None  # at the fp32 model
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    if model_kwargs:  # (revision, attn_implementation, ...): from_pretrained's to interpret
        return None
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    where: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), shard))
    expected = set(model.state_dict())
    tied = _tied_keys(model)
    if set(where) - expected or expected - set(where) - tied:
        return None  # renamed or converted checkpoint keys
    targets = linears_to_quantize(model, skip_modules)
    quantized = {f"{name}.weight" for name in targets}
    handles: dict[Path, Any] = {}

    def read(key: str) -> torch.Tensor:
        if where[key] not in handles:
            handles[where[key]] = safe_open(str(where[key]), framework="pt")
        t = handles[where[key]].get_tensor(key)
        return t.to(dtype) if t.is_floating_point() else t

    try:
        for key in sorted(set(where) - quantized):
            _put(model, key, read(key))
        model.tie_weights()
        quantize_model(model, compute_dtype, skip_modules, load_weight=lambda name: read(f"{name}.weight"))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"loading left {left[:3]} unset; this is a bug in loratune's quantized loader")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.name_or_path = str(path)
    return model.eval()


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share their tensor with another key (a tied head): the checkpoint may store one only."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update({name, seen[id(p)]})
        seen.setdefault(id(p), name)
    keys = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return tied | set(keys if isinstance(keys, (dict, list, set)) else [])


def _put(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Set parameter or persistent buffer ``key`` of ``model`` to ``value`` (replacing its meta placeholder)."""
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    else:
        module._buffers[leaf] = value
