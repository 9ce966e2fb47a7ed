"""Pure functions for LoRA's math. Everything else in loratune is a thin module around these."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def linear_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, fan_in_fan_out: bool = False):
    """ΔW = s·B·A for a Linear; transposed for GPT-2's Conv1D, which stores W as (in, out).

    A: (r, in), B: (out, r) -> (out, in), or (in, out) when fan_in_fan_out.
    """
    delta = (B @ A) * scaling
    return delta.T if fan_in_fan_out else delta


def embedding_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔE for an Embedding. A: (r, num_embeddings), B: (dim, r) -> (num_embeddings, dim)."""
    return (B @ A).T * scaling


def conv_delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW for a ConvNd whose LoRA is conv(A) then a 1×…×1 conv(B).

    A: (r, in, *k), B: (out, r, 1, …) -> (out, in, *k). Composing the two convolutions is a
    convolution whose kernel is B applied along A's output channels.
    """
    B2 = B.flatten(1)  # (out, r)
    return torch.einsum("or,r...->o...", B2, A) * scaling


def lora_linear_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The plain LoRA term s·B·A·dropout(x) for x (..., in) -> (..., out). The reference fast paths match."""
    return F.linear(F.linear(F.dropout(x, dropout, training), A), B) * scaling
