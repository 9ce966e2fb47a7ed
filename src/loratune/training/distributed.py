"""Data parallelism under torchrun: join the process group, sum gradients across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import settings


def setup() -> tuple[int, int]:
    """(rank, world) — under torchrun, join the process group (gloo on CPU, nccl on GPU)."""
    world = settings.get().world_size
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
