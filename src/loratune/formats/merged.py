"""A merged model: base + adapter written as one HF model directory (safetensors, tokenizer, chat template) that
``AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path

from ..fsutil import atomic_dir


def save_merged(lora_model, tok, out: Path) -> None:
    """``lora_model`` (a LoraModel) merged into its base, with ``tok``, as one HF model directory ``out``, written
    whole (``fsutil.atomic_dir``; an existing ``out`` is replaced only once the new one is complete)."""
    merged = lora_model.merge_and_unload(safe_merge=True)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


