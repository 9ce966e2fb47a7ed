"""The optimizer, the learning-rate schedule and the seeded order of examples."""

from __future__ import annotations

import math

import torch


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return f


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW over ``model``'s (a LoraModel's) trainable parameters; with LoRA+, each B gets lr × loraplus_lr_ratio."""
    adapters = [ad for _, layer in model.lora_layers() for ad in layer.adapters.values()]
    # as PEFT's LoRA+: B, and a DoRA adapter's magnitude vector (PEFT puts every 1-D LoRA parameter there), get the
    # faster rate
    b_ids = {id(ad.lora_B) for ad in adapters} | {id(ad.lora_magnitude_vector) for ad in adapters
                                                   if hasattr(ad, "lora_magnitude_vector")}
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.loraplus_lr_ratio:
        groups = [{"params": [p for p in params if id(p) not in b_ids], "lr": cfg.lr},
                  {"params": [p for p in params if id(p) in b_ids], "lr": cfg.lr * cfg.loraplus_lr_ratio}]
    else:
        groups = [{"params": params, "lr": cfg.lr}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


# epochs: auto. Small data wants several passes (the 600-row task: 3 % exact match after one epoch at a
# good rate's tenth, 95 % after three), large data one or less; so the run sees 3 × the rows, at least 800 row-passes
# (100 steps of 8: what a LoRA needs to move at all) and at most 16 000 (2 000 steps of 8: the cap keeps a default
# run on a laptop CPU to hours, not days); early stopping on the eval loss ends it sooner when it stops improving.
AUTO_PASSES, AUTO_MIN_ROWS, AUTO_MAX_ROWS = 3, 800, 16_000
AUTO_EVALS = 10  # evaluations in an epochs: auto run with eval_every 0


def auto_steps(n_rows: int, per_step: int) -> int:
    """The step budget of ``epochs: auto`` for ``n_rows`` training rows and ``per_step`` rows a step."""
    rows = min(max(AUTO_PASSES * n_rows, AUTO_MIN_ROWS), AUTO_MAX_ROWS)
    return max(1, math.ceil(rows / per_step))


def total_steps(n_rows: int, cfg, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps)."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = max(1, math.ceil(n_rows / per_step))
    if cfg.max_steps:
        return per_epoch, cfg.max_steps
    if cfg.auto_epochs:
        return per_epoch, auto_steps(n_rows, per_step)
    return per_epoch, max(1, math.ceil(cfg.epochs * per_epoch))


def eval_every(cfg, steps: int) -> int:
    """Steps between evaluations: ``train.eval_every``, or (0 with epochs auto) about ``AUTO_EVALS`` a run, so that
    early stopping has evaluations to compare; 0 = only at the end."""
    if cfg.eval_every or not cfg.auto_epochs:
        return cfg.eval_every
    return max(1, math.ceil(steps / AUTO_EVALS))


def global_batch(step: int, n_rows: int, per_epoch: int, per_step: int, seed: int) -> list[int]:
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * per_step:(i + 1) * per_step].tolist()
