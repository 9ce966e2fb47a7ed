"""Which modules an adapter targets: PEFT's matching rules as pure functions of module names."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

SEQ_CLS_HEADS = ("classifier", "score")  # classification heads that "all-linear" leaves alone


def name_matches(name: str, spec: list[str] | str | None) -> bool:
    """A list matches the full name or a dotted suffix; a str is a regex that must match the full name."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The block index in a name like ``model.layers.3.self_attn.q_proj`` (None if it has none)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)  # the first numbered block, as PEFT reads it
        return int(m.group(1)) if m else None
    for p in patterns:
        m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def in_layers(name: str, layers_to_transform: list[int] | int | None, layers_pattern=None) -> bool:
    if layers_to_transform is None:
        return True
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    idx = layer_index(name, layers_pattern)
    return idx is not None and idx in wanted


def pattern_value(patterns: dict, name: str, default):
    """``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the name's dotted tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def all_linear_targets(model: nn.Module, wrapped: tuple[type, ...] = ()) -> list[str]:
    """Leaf names of every Linear/Conv1D except the output head, as PEFT expands "all-linear".

    ``wrapped`` are the types of modules that wrap a base module (LoRA layers, modules_to_save): such a wrapper
    counts as the module it wraps (its ``base_layer``), and nothing inside it is a target of its own, so a second
    all-linear adapter finds the same modules as the first."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {id(head), id(getattr(head, "base_layer", None))} if head is not None else set()
    names, inside = set(), []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, wrapped):
            inside.append(name + ".")
            module = getattr(module, "base_layer", None)
        if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in heads:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in SEQ_CLS_HEADS:
                names.add(leaf)
    return sorted(names)
