"""Data parallelism under torchrun: join the process group, sum gradients across processes.

Every rank takes part in every collective of every step, whatever its share of the global batch: at the end of an
epoch the last global batch may be short, and a rank can have fewer rows than the others, or none. Such a rank
contributes zero gradients (never "no gradients", which would make it skip the all-reduce that the other ranks
wait in: a hang, or mismatched buffers when the next collective pairs with the wrong one).
"""

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
    """Sum the gradients of ``params`` over all ranks, in place, in one all-reduce per dtype.

    A parameter without a gradient (this rank had no rows in the step, or the parameter was not used) takes part
    with zeros, so that every rank sends buffers of the same size in the same order.
    """
    if world <= 1:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():  # (the order of params is the same on every rank: the model's own order)
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
