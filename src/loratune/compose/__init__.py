"""Adapter composition and rank tools, as pure functions of adapters (tensors under PEFT's keys + LoraConfig):
weighted combination (PEFT's ``add_weighted_adapter`` modes: cat, svd, linear, TIES, DARE, magnitude pruning),
rank analysis, resizing, and extraction of a LoRA from a fine-tuned model."""

from .combine import COMBINATION_TYPES, CombineReport, combine_adapters
from .factors import Adapter, Pair, delta_weights, lora_pairs
from .io import adapter_from_model, add_to_model, load_adapter, save_adapter

__all__ = ["COMBINATION_TYPES", "Adapter", "CombineReport", "Pair", "adapter_from_model", "add_to_model",
           "add_weighted_adapter", "combine_adapters", "delta_weights", "load_adapter", "lora_pairs",
           "save_adapter"]


def add_weighted_adapter(lora_model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, density: float | None = None,
                         majority_sign_method: str = "total", seed: int | None = None,
                         svd_clamp: float | None = None, allow_partial: bool = False) -> CombineReport:
    """PEFT's ``LoraModel.add_weighted_adapter`` for a loratune ``LoraModel``: adapter ``adapter_name`` made from
    the named ``adapters`` by ``combine_adapters`` (same modes and arguments), added (not active); returns the
    report (ranks, energy kept)."""
    from ..errors import LoraTuneError

    if adapter_name in lora_model.peft_config:
        raise LoraTuneError(f"adapter {adapter_name!r} already exists; pick another name or "
                            f"delete_adapter({adapter_name!r}) first")
    parts = [adapter_from_model(lora_model, n) for n in adapters]
    result, report = combine_adapters(parts, weights, combination_type, svd_rank=svd_rank, density=density,
                                      majority_sign_method=majority_sign_method, seed=seed, svd_clamp=svd_clamp,
                                      allow_partial=allow_partial, check_base=False, name=adapter_name)
    add_to_model(lora_model, result, adapter_name)
    return report
