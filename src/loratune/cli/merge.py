"""``loratune merge``: base + adapter written as one HF model directory."""

from __future__ import annotations

from pathlib import Path

from ..formats.merged import check_target, save_merged
from .infer import load_for_inference


def stored_dtype(name_or_path: str):
    """The dtype the base model's weights are stored in (its config.json's ``dtype``/``torch_dtype``) when that is
    bfloat16 or float16; None otherwise (float32, or not said)."""
    import json

    import torch

    from ..errors import LoraTuneError
    from ..models import resolve_model_path

    try:
        config = json.loads((resolve_model_path(name_or_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, LoraTuneError):
        return None  # (loading the model has already said what is wrong with it)
    name = str(config.get("dtype") or config.get("torch_dtype") or "")
    return getattr(torch, name) if name in ("bfloat16", "float16") else None


def cmd_merge(args) -> int:
    """The base is loaded in float32 whatever its stored precision (exact for bfloat16/float16 weights), ΔW is added
    in float32, and the sum is rounded once, to ``--dtype`` (default: the dtype the base was stored in)."""
    check_target(Path(args.out), args.overwrite, keep_inside=(Path(args.adapter),))
    import torch

    model, tok, _ = load_for_inference(args.adapter, args.model, device=args.device, dtype="float32")
    stored = stored_dtype(args.model or model.peft_config["default"].base_model_name_or_path or "")
    save_merged(model, tok, Path(args.out), dtype=getattr(torch, args.dtype) if args.dtype else stored)
    print(f"merged model written to {args.out}")
    return 0


