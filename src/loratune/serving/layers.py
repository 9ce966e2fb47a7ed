"""The base model's linear layers as the registry uses them: each wrapped once in an empty LoRA layer."""

from __future__ import annotations

from torch import nn

from .. import ops
from ..adapters.layers import LoraLayer, lora_class_for
from ..adapters.targets import all_linear_targets


def wrap_linear_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Wrap every linear layer but the output head (PEFT's "all-linear") in an empty LoRA layer; path -> layer."""
    leaves = set(all_linear_targets(model, wrapped=(LoraLayer,)))
    found = {}
    for path, module in list(model.named_modules()):
        if not path or path.rsplit(".", 1)[-1] not in leaves or any(path.startswith(p + ".") for p in found):
            continue
        if isinstance(module, LoraLayer):
            found[path] = module
            continue
        cls = lora_class_for(module)
        if cls is not None:
            layer = cls(module)
            model.set_submodule(path, layer)
            found[path] = layer
    ops.accelerate(model)  # the fused RMSNorm/SwiGLU between them, as LoraModel has
    return found


def out_in(layer: LoraLayer) -> tuple[int, int]:
    """(out_features, in_features) of the wrapped layer (GPT-2's Conv1D stores them the other way round)."""
    w = layer.weight
    return (w.shape[1], w.shape[0]) if getattr(layer, "fan_in_fan_out", False) else (w.shape[0], w.shape[1])
