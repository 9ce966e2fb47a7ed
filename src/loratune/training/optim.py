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


def total_steps(n_rows: int, cfg, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps)."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = max(1, math.ceil(n_rows / per_step))
    if cfg.max_steps:
        return per_epoch, cfg.max_steps
    return per_epoch, max(1, math.ceil((cfg.epochs or 1.0) * per_epoch))


def global_batch(step: int, n_rows: int, per_epoch: int, per_step: int, seed: int) -> list[int]:
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * per_step:(i + 1) * per_step].tolist()
