"""What a forced merge into 4 bits costs, measured: one warning for a whole model instead of one per layer.

Merging a QLoRA adapter into the NF4 weights themselves (``LoraModel.merge_and_unload(force=True)``) rounds each
W + ΔW to 4 bits again. ``NF4Linear.add_to_weight`` measures each layer's share (its output on random inputs
against a full-precision merge's). ``forced_merge_report(model)`` wraps the merge of a whole model: it runs the model
once on a fixed random probe before the merge (the adapters unmerged: the QLoRA model, which computes what a
full-precision merge computes, to round-off) and once after (the merged 4-bit model), and gives one warning with
the relative difference of the two outputs (the merged-4-bit model's output error against merged-fp32) and the
layers' figures. Inside it, the layers only record their figures.

The probe is a batch of random token ids for a model with ``config.vocab_size`` (a transformers LM); for another
model the warning gives the layers' figures only.
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .linear import NOTES, LayerMergeNote, NF4Linear

PROBE_SHAPE = (2, 32)  # token ids the model-level probe runs on (fixed seed)




def _probe(model: nn.Module) -> dict | None:
    """Random token ids for ``model`` (a transformers LM), or None for a model this cannot feed."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    params = list(model.parameters())
    if not isinstance(vocab, int) or vocab < 2 or not params:
        return None
    positions = getattr(model.config, "max_position_embeddings", None) or PROBE_SHAPE[1]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (PROBE_SHAPE[0], min(PROBE_SHAPE[1], positions)), generator=g)
    return {"input_ids": ids.to(params[0].device)}


@torch.no_grad()
def _run(model: nn.Module, probe: dict) -> torch.Tensor | None:
    """The model's output (logits) on the probe in eval mode (dropout off), as float64; None if it cannot run."""
    modes = {m: m.training for m in model.modules()}
    try:
        out = model.eval()(**probe)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return None
    finally:
        for m, mode in modes.items():
            m.training = mode
    out = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)
    return out.double() if isinstance(out, torch.Tensor) else None


def summary(notes: list[LayerMergeNote], model_error: float | None) -> str:
    """The one-line warning for a forced merge of ``notes``' layers (and the model's measured output error)."""
    what = (f"the merged 4-bit model's outputs (logits on a random probe) differ from a full-precision merge's by "
            f"{model_error:.2%} (relative norm); " if model_error is not None else "")
    rounding = statistics.median(n.rounding for n in notes)
    adapter = statistics.median(n.adapter for n in notes)
    return (f"merged into the 4-bit weights of {len(notes)} NF4 linear(s) (force=True): {what}rounding W+ΔW to 4 "
            f"bits again changes each layer's outputs by {rounding:.2%} (median, random inputs) where the adapter "
            f"changes them by {adapter:.2%}; merge into a full-precision copy instead (loratune.quant."
            "dequantize_model first) to keep the adapter exact")


@contextlib.contextmanager
def forced_merge_report(model: nn.Module) -> Iterator[None]:
    """Wrap a forced merge of ``model``'s active adapters into its NF4 layers: one warning (``summary``) at the end,
    with the model's measured output error, instead of one per layer. Nested or on a model without NF4 layers it
    does nothing of its own."""
    if NOTES.get() is not None or not any(isinstance(m, NF4Linear) for m in model.modules()):
        yield
        return
    probe = _probe(model)
    before = _run(model, probe) if probe is not None else None
    notes: list[LayerMergeNote] = []
    token = NOTES.set(notes)
    try:
        yield
    finally:
        NOTES.reset(token)
    if not notes:
        return
    after = _run(model, probe) if before is not None else None
    error = None
    if after is not None and after.shape == before.shape:
        error = ((after - before).norm() / before.norm().clamp(min=1e-300)).item()
    warnings.warn(summary(notes, error), stacklevel=3)
