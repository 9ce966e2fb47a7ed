"""LoRA variants behind one hook (``base.Variant``): DoRA (``dora.py``) and the initializations that split the base
weight, PiSSA / OLoRA / LoftQ (``init.py``). ``for_config`` picks an adapter's variant from its ``LoraConfig``;
``check_targets`` refuses, before the model is touched, a variant on a layer kind it does not support.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ..config import LoraConfig
from .base import Variant
from .dora import Dora, dense_row_norms, merged_weight, row_norms
from .init import (
    CONVERTIBLE,
    MUTATING,
    WeightInit,
    converted_config,
    converted_factors,
    factors_for,
    init_kind,
    initializer_for,
    loftq_factors,
    olora_factors,
    pissa_factors,
    saved_as_lora,
)

__all__ = [
    "CONVERTIBLE", "MUTATING", "Dora", "Variant", "WeightInit", "check_targets", "converted_config",
    "converted_factors", "dense_row_norms", "factors_for", "for_config", "init_kind", "initializer_for",
    "loftq_factors", "merged_weight", "olora_factors", "pissa_factors", "row_norms", "saved_as_lora",
    "TrainingHooks", "training_hooks",
]


class TrainingHooks:
    """What a variant adds to each optimizer step of the training loop; plain LoRA, DoRA and the initializations
    add nothing (these no-ops). ``penalty`` is a loss term added once per optimizer step (its gradient joins the
    step's); ``after_step`` runs after ``optimizer.step()`` and before the gradients are cleared."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_step(self, step: int, total_steps: int) -> None:
        pass


def training_hooks(model: nn.Module) -> TrainingHooks:
    """The training hooks of ``model``'s active adapter's variant (a LoraModel)."""
    return TrainingHooks()


def for_config(config: LoraConfig) -> Variant | None:
    """The variant of an adapter made from ``config``: ``Dora`` with ``use_dora``, a plain ``Variant`` carrying the
    initializer for PiSSA/OLoRA/LoftQ, or None (plain LoRA, nothing to hook)."""
    initializer = initializer_for(config)
    if config.use_dora:
        return Dora(initializer)
    return Variant(initializer) if initializer is not None else None


def check_targets(variant: Variant | None, targets: list[tuple[str, nn.Module]]) -> None:
    """A one-line ConfigError if ``variant`` cannot go on one of ``targets`` ((path, base module) pairs)."""
    if variant is None:
        return
    for path, module in targets:
        base = getattr(module, "base_layer", module)  # (a module already wrapped for another adapter)
        problem = variant.check(path, base)
        if problem is not None:
            raise ConfigError(problem)
