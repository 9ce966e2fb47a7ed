"""Task-vector merging on plain tensors, with PEFT's semantics (``peft.utils.merge_utils``): task arithmetic,
magnitude pruning, TIES (trim, elect sign, disjoint mean; Yadav et al. 2023) and DARE (random drop and rescale;
Yu et al. 2023).

Every function takes the task tensors (one per adapter, same shape), their weights and, where it prunes, a
``density`` in (0, 1]: the fraction of entries kept (1 keeps all, as PEFT). Random drops take a
``torch.Generator``: masks are drawn as float32 ``torch.bernoulli`` on each tensor in turn, so a generator in the
same state draws the same masks as PEFT does from the global one. Results are in the tensors' dtype.
"""

from __future__ import annotations

import torch

SIGN_METHODS = ("total", "frequency")


def _weighted(tensors: list[torch.Tensor], weights: list[float] | torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))


def task_arithmetic(tensors: list[torch.Tensor], weights: list[float] | torch.Tensor) -> torch.Tensor:
    """Σ wᵢ·tᵢ."""
    return _weighted(tensors, weights).sum(0)


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the int(density·numel) entries of largest magnitude, 0 elsewhere (all ones at density ≥ 1)."""
    if density >= 1:
        return torch.ones_like(t)
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel())).indices] = 1
    return mask.reshape(t.shape)


def random_mask(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (a float32 Bernoulli draw shaped like ``t``)."""
    full = torch.full(t.shape, density, dtype=torch.float32, device=t.device)
    return torch.bernoulli(full, generator=generator).to(t.dtype)


def magnitude_prune_tensor(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its top-``density`` entries by magnitude set to 0."""
    return t * magnitude_mask(t, density)


def random_prune_tensor(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop: each entry kept with probability ``density`` and the kept ones divided by it (unbiased)."""
    if density >= 1:
        return t
    return t * random_mask(t, density, generator) / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry, whether each task tensor's sign is the elected one: the sign of the sum ("total") or the more
    frequent sign ("frequency") across dim 0, ties going to +."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1, -1).to(sign.dtype)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1).to(weighted.dtype)


def magnitude_prune(tensors: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    """Σ wᵢ·trim(tᵢ): task arithmetic on magnitude-pruned tensors."""
    return task_arithmetic([magnitude_prune_tensor(t, density) for t in tensors], weights)


def ties(tensors: list[torch.Tensor], weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES: trim each tensor to its top-``density`` entries, elect a sign per entry from the trimmed (unweighted)
    tensors, then average the weighted entries that agree with it."""
    trimmed = torch.stack([magnitude_prune_tensor(t, density) for t in tensors])
    mask = majority_sign_mask(trimmed, majority_sign_method)
    return disjoint_merge(_weighted(list(trimmed), weights), mask)


def dare_linear(tensors: list[torch.Tensor], weights, density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: random drop with rescale, then Σ wᵢ·tᵢ."""
    return task_arithmetic([random_prune_tensor(t, density, generator) for t in tensors], weights)


def dare_ties(tensors: list[torch.Tensor], weights, density: float, majority_sign_method: str = "total",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop, then TIES' sign election and disjoint mean."""
    dropped = torch.stack([random_prune_tensor(t, density, generator) for t in tensors])
    mask = majority_sign_mask(dropped, majority_sign_method)
    return disjoint_merge(_weighted(list(dropped), weights), mask)


def combine_tensors(method: str, tensors: list[torch.Tensor], weights, density: float | None = None,
                    majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One of "linear" (task arithmetic), "ties", "dare_linear", "dare_ties", "magnitude_prune" on ``tensors``."""
    if method == "linear":
        return task_arithmetic(tensors, weights)
    if method == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method, generator)
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"unknown tensor combination {method!r}")
