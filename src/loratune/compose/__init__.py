"""Adapter composition and rank tools over adapters held as data (tensors under PEFT's keys + LoraConfig):
weighted combination (PEFT's ``add_weighted_adapter`` modes: cat, svd, linear, TIES, DARE, magnitude pruning),
rank analysis (``rank``), resizing, extraction of a LoRA from a fine-tuned model (``extract``), PEFT-format
directories (``io``) and plots (``plot``).

The combination math itself is pure and lives one layer down, in ``loratune.adapters.weighted`` (with the factor
representation in ``adapters.factors`` and TIES/DARE on tensors in ``adapters.merge_ops``), so that
``LoraModel.add_weighted_adapter`` can offer it without the adapters layer importing this one; it is re-exported
here.
"""

from ..adapters.factors import Adapter, Pair, delta_weights, lora_pairs
from ..adapters.weighted import (
    COMBINATION_TYPES,
    CombineReport,
    adapter_from_model,
    add_to_model,
    add_weighted_adapter,
    combine_adapters,
)
from .extract import ExtractReport, extract_lora
from .io import load_adapter, save_adapter
from .rank import Analysis, analyze_adapter, resize_adapter

__all__ = ["COMBINATION_TYPES", "Adapter", "Analysis", "CombineReport", "ExtractReport", "Pair",
           "adapter_from_model", "add_to_model", "add_weighted_adapter", "analyze_adapter", "combine_adapters",
           "delta_weights", "extract_lora", "load_adapter", "lora_pairs", "resize_adapter", "save_adapter"]
