"""A merged model: base + adapter written as one HF model directory (safetensors, tokenizer, chat template) that
``AutoModelForCausalLM.from_pretrained`` loads. A marker file says loratune wrote it, so that a later merge may
replace it, and nothing else is ever replaced without ``overwrite``."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import quant
from ..errors import LoraTuneError
from ..fsutil import atomic_dir, save_json, writable_place

MARKER = ".loratune-merged.json"  # written into every merged directory


def check_target(out: Path, overwrite: bool = False, keep_inside: tuple[Path, ...] = ()) -> None:
    """Refuse an ``out`` that a merge must not write: a file, an unwritable place, the working directory or one
    that holds it (or holds one of ``keep_inside``, e.g. the adapter being merged), or a non-empty directory
    loratune did not write (unless ``overwrite``). Checked before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise LoraTuneError(f"--out {out} is a file; give a directory (new, empty, or an earlier merge's)")
    resolved = out.resolve()
    for inner in (Path.cwd(), *keep_inside):
        inner = inner.resolve()
        if resolved == inner or resolved in inner.parents:
            raise LoraTuneError(f"--out {out} is or holds {inner}, which must not be replaced; give a new "
                                "directory such as merged/")
    problem = writable_place(out)
    if problem:
        raise LoraTuneError(f"--out {out} cannot be written ({problem}); choose a directory you can write to")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise LoraTuneError(f"--out {out} is not empty and was not written by loratune merge; give a new or empty "
                            "directory, or pass --overwrite to replace it (its contents are then deleted)")


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
