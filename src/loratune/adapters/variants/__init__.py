"""LoRA variants behind one hook (``base.Variant``): DoRA (``dora.py``), AdaLoRA (``adalora.py``) and the
initializations that split the base weight, PiSSA / OLoRA / LoftQ (``init.py``). ``for_config`` picks an adapter's
variant from its ``LoraConfig``; ``check_targets`` refuses, before the model is touched, a variant on a layer kind it
does not support; ``training_hooks`` gives what a variant adds to the training loop's steps (AdaLoRA's).
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ..config import LoraConfig
from ..targets import pattern_value
from .adalora import (
    AdaLora,
    AdaLoraHooks,
    RankAllocator,
    adalora_delta,
    adalora_factors,
    adalora_scaling,
    adalora_term,
    orth_penalty,
)
from .base import TrainingHooks, Variant
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
    "AdaLora", "AdaLoraHooks", "RankAllocator", "adalora_delta", "adalora_factors", "adalora_scaling", "adalora_term",
    "layer_rank", "orth_penalty",
    "CONVERTIBLE", "MUTATING", "Dora", "Variant", "WeightInit", "check_targets", "converted_config",
    "converted_factors", "dense_row_norms", "factors_for", "for_config", "init_kind", "initializer_for",
    "loftq_factors", "merged_weight", "olora_factors", "pissa_factors", "row_norms", "saved_as_lora",
    "TrainingHooks", "training_hooks",
]


def training_hooks(model: nn.Module, total_steps: int | None = None) -> TrainingHooks:
    """The training hooks of ``model``'s (a LoraModel's) active adapters: AdaLoRA's (``AdaLoraHooks``: its
    orthogonality penalty and rank allocator) for the first active AdaLoRA adapter that trains, else no-ops.
    ``total_steps``: the run's step count, AdaLoRA's ``total_step`` where its config has none (checked here)."""
    for name in model.active_adapters:
        if model.peft_config[name].use_adalora:
            factors = adalora_factors(model, name)
            if any(f.lora_E.requires_grad for f in factors.values()):
                return AdaLoraHooks(model.peft_config[name], factors, total_steps)
    return TrainingHooks()


def layer_rank(config: LoraConfig, path: str) -> int:
    """The rank an adapter made from ``config`` has at module ``path``: ``rank_pattern``'s value or ``r``; AdaLoRA's
    ``init_r`` (its ``rank_pattern`` masks triplets within it)."""
    return config.init_r if config.use_adalora else pattern_value(config.rank_pattern, path, config.r)


def for_config(config: LoraConfig) -> Variant | None:
    """The variant of an adapter made from ``config``: ``AdaLora`` with ``use_adalora``, ``Dora`` with
    ``use_dora``, a plain ``Variant`` carrying the initializer for PiSSA/OLoRA/LoftQ, or None (plain LoRA)."""
    if config.use_adalora:
        return AdaLora(random=config.init_lora_weights is False)
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
