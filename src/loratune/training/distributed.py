"""Data parallelism under torchrun: join the process group, sum gradients across processes.

Every rank takes part in every collective of every step, whatever its share of the global batch: at the end of an
epoch the last global batch may be short, and a rank can have fewer rows than the others, or none. Such a rank
contributes zero gradients (never "no gradients", which would make it skip the all-reduce that the other ranks
wait in: a hang, or mismatched buffers when the next collective pairs with the wrong one).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import settings
from ..errors import LoraTuneError


class DistributedError(LoraTuneError):
    """A multi-process setting that cannot work as given (fsdp without torchrun, say)."""


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


# --- devices and process groups -----------------------------------------------------------------------
def local_rank() -> int:
    """This process's rank on its machine under torchrun (0 otherwise): which GPU it takes."""
    return dist.get_node_local_rank(fallback_rank=0) if settings.get().world_size > 1 else 0


def join(device: torch.device) -> tuple[int, int]:
    """(rank, world): under torchrun, join the process group, NCCL for CUDA devices and gloo otherwise."""
    world = settings.get().world_size
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# --- FSDP2 -------------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (the classes its ``_no_split_modules`` names, e.g.
    LlamaDecoderLayer, GPT2Block): what FSDP shards one by one and torch.compile compiles one by one."""
    hf = getattr(model, "model", model) if hasattr(model, "peft_config") else model
    names = set(getattr(hf, "_no_split_modules", None) or [])
    return [m for m in hf.modules() if type(m).__name__ in names]


def shard(lm: torch.nn.Module, device: torch.device) -> int:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer of ``lm``: each layer's weights,
    frozen base and adapters alike, split over the processes, gathered for its forward and backward only. The
    embeddings, final norm and output head stay whole on every process (the chunked loss reads the head's weight
    outside any module's forward). Gradients are reduce-scattered as sums (divide factor 1: the loss is already
    divided by the global batch's token count; FSDP's default would average them, and on gloo it sums them,
    pytorch/pytorch#162338). Returns the number of sharded layers."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(lm)
    if not layers:
        raise DistributedError(f"train.distributed=fsdp: no decoder layers found in {type(lm.model).__name__} (its "
                               "_no_split_modules names none); use train.distributed=ddp")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)  # sums, not means ...
        layer.set_force_sum_reduction_for_comms(True)  # ... as plain SUM collectives (gloo has no PREMUL_SUM)
    lm.to(device)
    return len(layers)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole on every process (a collective); a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


@contextlib.contextmanager
def whole_params(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Within the block, each sharded parameter of ``params`` is a whole (gathered) one in its module, so that code
    that reads modules (``save_pretrained``) sees the full adapter. Every process must enter (gathering is a
    collective); afterwards the sharded parameters are put back."""
    wanted = {id(p) for p in params if is_sharded(p)}
    swaps = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in wanted:
                swaps.append((module, name, p))
    whole = [torch.nn.Parameter(full(p).detach(), requires_grad=p.requires_grad) for _, _, p in swaps]
    try:
        for (module, name, _), w in zip(swaps, whole):
            module._parameters[name] = w
        yield
    finally:
        for module, name, p in swaps:
            module._parameters[name] = p


def optimizer_tensors_whole(opt: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state with sharded tensors gathered whole (a collective under FSDP)."""
    return {pid: {k: full(v) if torch.is_tensor(v) else v for k, v in st.items()}
            for pid, st in opt.state_dict()["state"].items()}


def shard_like(params: list[torch.nn.Parameter], state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Turn whole optimizer-state tensors (read from a checkpoint) into shards of their sharded parameters, in
    place; ``params`` in the optimizer's order."""
    from torch.distributed.tensor import distribute_tensor

    for pid, st in state.items():
        p = params[pid]
        if not is_sharded(p):
            continue
        for k, v in st.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                st[k] = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of sharded (FSDP) and whole gradients: the shards' squares are
    summed over the processes, the whole ones (the same on every process) counted once."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local() for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    device = (sharded or whole)[0].device
    sq_sharded = sum((g.float().pow(2).sum() for g in sharded), torch.zeros((), device=device))
    if sharded and dist.is_initialized():
        dist.all_reduce(sq_sharded)
    total = (sq_sharded + sum((g.float().pow(2).sum() for g in whole), torch.zeros((), device=device))).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in sharded + whole:
        g.mul_(scale.to(g.dtype))
    return total


def rng_states(world: int) -> list[dict[str, torch.Tensor]]:
    """Every process's random-generator states (the CPU's, and the CUDA device's where in use), by rank: a
    collective under torchrun. Dropout draws from them, differently on each process, so a checkpoint keeps all."""
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["cuda"] = torch.cuda.get_rng_state()
    if world <= 1:
        return [own]
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for key, state in own.items():
        parts = [torch.empty_like(state, device=on) for _ in range(world)]
        dist.all_gather(parts, state.to(on))
        for r, part in enumerate(parts):
            out[r][key] = part.cpu()
    return out
