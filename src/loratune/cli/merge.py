"""``loratune merge``: base + adapter written as one HF model directory."""

from __future__ import annotations

from pathlib import Path

from ..formats.merged import check_target, save_merged
from .infer import load_for_inference


def cmd_merge(args) -> int:
    check_target(Path(args.out), args.overwrite, keep_inside=(Path(args.adapter),))
    import torch

    model, tok, _ = load_for_inference(args.adapter, args.model)
    save_merged(model, tok, Path(args.out), dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"merged model written to {args.out}")
    return 0


