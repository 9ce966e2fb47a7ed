"""A merged model: base + adapter written as one HF model directory (safetensors, tokenizer, chat template) that
``AutoModelForCausalLM.from_pretrained`` loads. A marker file says loratune wrote it, so that a later merge may
replace it, and nothing else is ever replaced without ``overwrite``."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import quant
from ..fsutil import atomic_dir, check_out_dir, save_json

MARKER = ".loratune-merged.json"  # written into every merged directory


def check_target(out: Path, overwrite: bool = False, keep_inside: tuple[Path, ...] = ()) -> None:
    """Refuse an ``out`` that a merge must not write (``fsutil.check_out_dir``; ``keep_inside``: e.g. the adapter
    being merged). Checked before any model is loaded."""
    check_out_dir(out, MARKER, "loratune merge", overwrite, keep_inside, example="merged/")


def save_merged(lora_model, tok, out: Path, dtype: torch.dtype | None = None) -> None:
    """``lora_model`` (a LoraModel) merged into its base, with ``tok``, as one HF model directory ``out``, written
    whole (``fsutil.atomic_dir``: an existing ``out`` is replaced only once the new one is complete).

    A 4-bit base (QLoRA) is first dequantized: the adapter merges into the full-precision copy of the weights it was
    trained against, never into 4 bits. The merged weights are saved in ``dtype`` (default: as they are; ΔW is
    added in the weights' own precision and rounded once)."""
    q = quant.quantization_settings(lora_model.model)
    if q is not None:
        quant.dequantize_model(lora_model.model, torch.float32)
    merged = lora_model.merge_and_unload(safe_merge=True)
    if dtype is not None:
        merged.to(dtype)
        merged.config.dtype = dtype
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        save_json({"written_by": "loratune merge", "adapters": list(getattr(lora_model, "peft_config", {}))},
                  tmp / MARKER)
