"""The training loop: plain, seeded, resumable, and data-parallel under torchrun.

Determinism is what makes resume exact: the order of examples in epoch e is a permutation seeded by
(seed, e), so a checkpoint only needs the step number, the optimizer/scheduler state and the RNG state
(for dropout). Each optimizer step consumes one *global* batch of batch_size × grad_accum × world rows;
the loss is summed over tokens and divided by the global batch's token count, so one process with
grad_accum=2 and two processes with grad_accum=1 compute the same gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import devices, ops, settings
from ..adapters import LoraModel, get_lora_model, variants
from ..adapters.files import PROMPT_NAME, load_adapter_weights
from ..data import DataConfig, PreparedData, collate, prepare
from ..errors import ConfigWarning, LoraTuneError
from ..fsutil import atomic_dir, save_json, write_text
from ..models import base_reference, load_base_model
from . import distributed
from .checkpoints import (
    TrainingError,
    check_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_hook_state,
    prune_checkpoints,
    save_checkpoint,
)
from .compiled import compile_layers
from .config import RunConfig, dump_run_config
from .early_stop import BestKeeper
from .evaluate import eval_loss, response_loss_sum
from .lr_search import resolve_lr
from .optim import eval_every, global_batch, lr_lambda, make_optimizer, total_steps
from .rundir import check_output_dir, claim_output_dir, note_choices, past_length, read_history, write_loss_curve
from .tracking import RunLog, check_trackers

PROMPT_FILE = PROMPT_NAME  # how prompts were built in training (and the base's own name), for eval/generate/chat
__all__ = ["PROMPT_FILE", "RunResult", "TrainingError", "require_causal_lm", "train"]


@dataclass
class RunResult:
    model: LoraModel
    tokenizer: object
    data: PreparedData
    adapter_dir: Path
    history: list[dict]
    steps: int
    seconds: float
    rank: int = 0  # this process's rank under torchrun: only rank 0 prints the summary
    lr: float | None = None  # the rate trained with (train.lr, or what lr: auto chose)
    best_step: int | None = None  # the step whose adapter was kept (load_best), None: the last
    stopped_early: bool = False


def fit_to_model(data_cfg: DataConfig, model) -> DataConfig:
    """``data_cfg`` with ``max_seq_len`` cut to the model's ``max_position_embeddings`` (with a note) where it is
    longer: packed rows would otherwise run past the positions the model was trained for."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 1 < limit < data_cfg.max_seq_len:
        warnings.warn(f"data.max_seq_len={data_cfg.max_seq_len} is beyond the model's max_position_embeddings="
                      f"{limit}; rows are limited to {limit} tokens (set data.max_seq_len to at most {limit})",
                      ConfigWarning, stacklevel=2)
        return dataclasses.replace(data_cfg, max_seq_len=limit)
    return data_cfg


def require_causal_lm(model, name: str) -> None:
    """loratune trains and generates with causal LMs; say so plainly for anything else (e.g. a BERT classifier)."""
    if not model.can_generate():
        raise LoraTuneError(f"model '{name}' is a {type(model).__name__}, not a causal language model; train, "
                            "eval, generate and chat need one (e.g. model=smollm2-135m-instruct); an encoder is "
                            "trained as a classifier with task: classification in the config (docs/classification.md)")


# --- the loop -----------------------------------------------------------------------------------------
def train(cfg: RunConfig, overwrite: bool = False, model_and_tokenizer=None, data: PreparedData | None = None,
          progress: bool = True, stop_after: int | None = None) -> RunResult:
    """Fine-tune a LoRA adapter as ``cfg`` says; resumes from the latest checkpoint in ``output_dir``.

    The base is loaded in ``cfg.model.dtype`` on ``cfg.train.device`` (a ``model_and_tokenizer`` given is moved
    there as it is); under torchrun, ``cfg.train.distributed`` is ddp (adapters on every process, gradients summed)
    or fsdp (FSDP2 per decoder layer). ``stop_after`` ends the run after that many steps as if killed (tests of
    resume use it).
    """
    tc = cfg.train
    world = settings.get().world_size
    if tc.distributed == "fsdp" and world < 2:
        raise distributed.DistributedError(
            "train.distributed=fsdp shards the model over several processes, but this is one process; start it "
            "with torchrun --nproc_per_node=N -m loratune train ..., or set train.distributed=ddp")
    device = devices.resolve_device(tc.device, distributed.local_rank(), key="train.device")
    if world > 1 and tc.device.startswith("cuda:"):
        raise distributed.DistributedError(
            f"train.device={tc.device} under torchrun: each process takes the GPU of its local rank; set "
            "train.device=cuda (or auto)")
    dtype = devices.resolve_dtype(cfg.model.dtype, device, key="model.dtype")
    fsdp = tc.distributed == "fsdp" and world > 1
    rank, world = distributed.join(device)
    out = Path(cfg.output_dir)
    config_text = dump_run_config(cfg)
    check_output_dir(out, config_text, overwrite)
    check_trackers(tc.report_to)

    torch.manual_seed(tc.seed)
    load_on = torch.device("cpu") if fsdp else device  # FSDP: each process moves only its shards to the device
    model, tok = model_and_tokenizer or load_base_model(cfg.model.name, dtype=dtype, device=load_on,
                                                        **cfg.model.load_kwargs())
    model.to(load_on)
    require_causal_lm(model, cfg.model.name)
    if data is None:
        data = prepare(fit_to_model(cfg.data, model), tok, seed=tc.seed)
        if rank == 0 and progress:
            print("data\n  " + "\n  ".join(data.report_lines()), flush=True)
    torch.manual_seed(tc.seed)  # adapter init does not depend on what loading consumed
    lcfg = cfg.lora_config()
    if not lcfg.base_model_name_or_path:  # a path PEFT's AutoPeftModel resolves (the bundled model's HF copy)
        lcfg.base_model_name_or_path = base_reference(cfg.model.name)  # (a model given in memory too: quickstart)
    lm = get_lora_model(model, lcfg)
    # Only now, with model, data and adapter config known to work, does the run take the output dir: a run that
    # fails validation leaves nothing behind that would block the corrected command.
    if rank == 0:
        claim_output_dir(out, config_text, overwrite)
        write_text(out / "data_report.txt", "".join(line + "\n" for line in data.report_lines()))
    if world > 1:
        dist.barrier()
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()

    per_epoch, steps = total_steps(len(data.train), tc, world)
    per_step = tc.batch_size * tc.grad_accum * world
    search = resolve_lr(lm, data.train, tok.pad_token_id, tc, out, steps, rank, device, progress) \
        if tc.auto_lr else None
    if search is not None:  # the run trains with the chosen rate; the config (and run_config.yaml) still says auto
        tc = dataclasses.replace(tc, lr=search.lr)
    every = eval_every(tc, steps) if data.eval else 0
    chosen = {}  # what auto chose, said in run_config.yaml
    if search is not None:
        chosen["train.lr"] = f"{tc.lr:g} (" + ("the search: lr_search.json" if search.candidates
                                             else "the run is too short to search") + ")"
    if tc.auto_epochs:
        chosen["train.epochs"] = f"{steps} steps ({steps / per_epoch:.3g} epochs)" + (
            f", an evaluation every {every}" if every else ", no eval rows: no evaluations")
    if chosen and rank == 0:
        note_choices(out, config_text, chosen)
    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        check_checkpoint(ckpt, config_text)
        load_adapter_weights(lm, ckpt / "adapter", "default")  # (before sharding: the file holds whole tensors)
    if fsdp:
        distributed.shard(lm, device)
    if tc.compile:
        compile_layers(lm)
    opt = make_optimizer(lm, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.scheduler, int(tc.warmup_ratio * steps), steps))
    params = [p for p in lm.parameters() if p.requires_grad]
    whole = [p for p in params if not distributed.is_sharded(p)]  # FSDP reduces the sharded ones itself
    if ckpt is not None:
        start = load_checkpoint(ckpt, lm, opt, sched, config_text, adapter=False,
                                place=distributed.shard_like if fsdp else None, rank=rank)
        if start > steps:
            raise past_length(out, start, steps)
        if rank == 0:
            print(f"run already complete ({steps} steps); writing its outputs again" if start >= steps
                  else f"resuming from {ckpt} (step {start} of {steps})", flush=True)
    # torch's RNG drives dropout; the same seed on every rank would give every shard the same masks
    if world > 1 and start == 0:
        torch.manual_seed(tc.seed + 1000 * rank)

    log = RunLog(out, read_history(out / "metrics.jsonl", start), start, steps, progress, rank, tc.report_to,
                 config=cfg.to_dict())
    history = log.history
    keeper = BestKeeper(out, tc.patience if data.eval else 0, tc.keep_best and bool(data.eval) and not fsdp,
                        history, rank, tc.threshold)
    end = start if keeper.stopped else steps  # a run that stopped early is complete
    if keeper.stopped and rank == 0:
        print(f"run already complete (stopped early at step {start}); writing its outputs again", flush=True)
    hooks = variants.training_hooks(lm, steps)  # what a variant adds to a step (AdaLoRA: penalty, rank allocation)
    if ckpt is not None:
        hooks.load_state_dict(load_hook_state(ckpt))
    pad = tok.pad_token_id
    t0, tokens_seen = time.time(), 0
    before = history[-1].get("time_s", 0.0) if history else 0.0  # training seconds of the run's earlier sessions
    step = start
    for step in range(start + 1, end + 1):
        rows = global_batch(step - 1, len(data.train), per_epoch, per_step, tc.seed)
        n_tokens = sum(sum(1 for v in data.train[i].labels[1:] if v != ops.IGNORE_INDEX) for i in rows)
        mine = rows[rank * tc.batch_size * tc.grad_accum:(rank + 1) * tc.batch_size * tc.grad_accum]
        step_loss = torch.zeros((), device=device)
        # Under FSDP every process runs grad_accum forwards and backwards (their all-gathers and reduce-scatters
        # pair up across processes); a micro-batch without rows of this process runs one row with weight 0.
        chunks = range(0, tc.grad_accum * tc.batch_size if fsdp else len(mine), tc.batch_size)
        for k in chunks:
            part = mine[k:k + tc.batch_size]
            batch = devices.to_device(collate([data.train[i] for i in part or rows[:1]], pad), device)
            loss_sum, _ = response_loss_sum(lm, batch)
            ((loss_sum if part else loss_sum * 0) / max(n_tokens, 1)).backward()
            if part:
                step_loss += loss_sum.detach()
                tokens_seen += int(batch["attention_mask"].sum())
        penalty = hooks.penalty()
        if penalty is not None:
            penalty.backward()
        if world > 1:
            dist.all_reduce(step_loss)
        loss = step_loss.item() / max(n_tokens, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {step}; lower train.lr (now {tc.lr}) or check the data")
        distributed.all_reduce_grads(whole, world)
        # the global gradient's norm, before clipping (logged: a wrong reduction across processes shows here)
        clip = distributed.clip_grad_norm if fsdp else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, tc.max_grad_norm or math.inf).item()
        lr = sched.get_last_lr()[0]  # the rate this step uses (read before sched.step() moves on)
        opt.step()
        hooks.after_step(step, steps)  # (before zero_grad: a variant may read this step's gradients)
        sched.step()
        opt.zero_grad(set_to_none=True)

        now = time.time() - t0
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_seen * world / max(now, 1e-9), "time_s": before + now}
        if data.eval and (step == steps or (every and step % every == 0)):
            record["eval_loss"] = eval_loss(lm, data.eval, pad, tc.eval_batch_size)["loss"]
        log.step(record)
        if "eval_loss" in record and keeper.update(step, record["eval_loss"], lm):
            end = step  # early stopping: this step is the run's last
        # The last step is always checkpointed: rerunning a finished command then has nothing left to do.
        if step == end or (tc.save_every and step % tc.save_every == 0):
            _checkpoint(out, step, lm, opt, sched, config_text, tc, rank, params, fsdp, hooks)
        if step == end or (stop_after is not None and step - start >= stop_after):
            break
    if step == end and history and "eval_loss" in history[-1]:
        log.final({"eval_loss": keeper.best_loss if keeper.keep else history[-1]["eval_loss"]})
    log.close()
    ops.clear_mask_cache()  # let go of the last input's x⊙mask: evaluation and merging need none
    ops.release_workspace()  # and of the loss's kept chunk × vocab buffer
    if step != end:  # stopped (as if killed) by stop_after: no adapter yet
        return RunResult(lm, tok, data, out / "adapter", history, step, time.time() - t0, rank, tc.lr)
    stopped_early = end < steps
    if stopped_early and rank == 0:
        why = (f"the eval loss fell by no more than {keeper.threshold:g}" if keeper.threshold
               else "no new best eval loss") + f" over the last {keeper.patience} evaluations"
        print(f"early stopping at step {end}: {why} (best {keeper.best_loss:.4f} at step {keeper.best_step})",
              flush=True)
    best_step = keeper.restore_best(lm)
    if best_step is not None and rank == 0:
        print(f"final adapter: the best evaluation's, step {best_step} (train.load_best)", flush=True)
    meta = {"lr": tc.lr, "lr_search": dataclasses.asdict(search) if search else None, "steps": end,
            "planned_steps": steps, "stopped_early": stopped_early, "best_step": best_step,
            "best_eval_loss": keeper.best_loss if math.isfinite(keeper.best_loss) else None}

    adapter_dir = out / "adapter"
    with distributed.whole_params(lm, params) if fsdp else contextlib.nullcontext():
        if rank == 0:
            with atomic_dir(adapter_dir) as tmp:  # whole or not at all: never new weights beside an old config
                lm.save_pretrained(tmp)
                if cfg.data.chat_template:
                    tok.chat_template = cfg.data.chat_template
                tok.save_pretrained(tmp)  # the chat template travels with the adapter
                save_json({"system_prompt": cfg.data.system_prompt, "base_model": cfg.model.name,
                           "training": meta}, tmp / PROMPT_FILE)
            write_loss_curve(history, out / "loss_curve.png")
    if world > 1:
        dist.barrier()
    seconds = history[-1].get("time_s", time.time() - t0) if history else 0.0  # the run's, not this session's
    return RunResult(lm, tok, data, adapter_dir, history, step, seconds, rank, tc.lr, best_step, stopped_early)


def _checkpoint(out: Path, step: int, lm, opt, sched, config_text: str, tc, rank: int, params, fsdp: bool,
                hooks: variants.TrainingHooks) -> None:
    """checkpoints/step-N, written by rank 0, with every process's generator states; under FSDP every process
    first gathers its shards (collectives, all)."""
    rng = distributed.rng_states(dist.get_world_size() if dist.is_initialized() else 1)
    state = distributed.optimizer_tensors_whole(opt) if fsdp else None
    with distributed.whole_params(lm, params) if fsdp else contextlib.nullcontext():
        if rank == 0:
            save_checkpoint(out, step, lm, opt, sched, config_text, optimizer_state=state, rng=rng,
                            hook_state=hooks.state_dict())
            prune_checkpoints(out, tc.keep_checkpoints)
