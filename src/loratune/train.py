"""The training loop: plain, seeded, resumable, and data-parallel under torchrun.

Determinism is what makes resume exact: the order of examples in epoch e is a permutation seeded by
(seed, e), so a checkpoint only needs the step number, the optimizer/scheduler state and the RNG state
(for dropout). Each optimizer step consumes one *global* batch of batch_size × grad_accum × world rows;
the loss is summed over tokens and divided by the global batch's token count, so one process with
grad_accum=2 and two processes with grad_accum=1 compute the same gradient.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import fused, losses
from .base_models import load_base_model
from .data import PreparedData, collate, prepare
from .errors import LoraTuneError
from .evaluate import eval_loss, response_loss_sum
from .io import public_modes, save_json, save_tensors
from .model import LoraModel, get_lora_model
from .runconfig import RunConfig, dump_run_config

CHECKPOINTS = "checkpoints"
PROMPT_FILE = "loratune_prompt.json"  # how prompts were built in training, for eval/generate/chat


class TrainingError(LoraTuneError):
    """Training cannot go on (non-finite loss, mismatched checkpoint, occupied output dir)."""


@dataclass
class RunResult:
    model: LoraModel
    tokenizer: object
    data: PreparedData
    adapter_dir: Path
    history: list[dict]
    steps: int
    seconds: float


# --- distributed --------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int]:
    """(rank, world) — under torchrun, join the process group (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    if world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


# --- schedule -----------------------------------------------------------------------------------------
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


def make_optimizer(model: LoraModel, cfg) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; with LoRA+, each B gets lr × loraplus_lr_ratio."""
    b_ids = {id(ad.lora_B) for _, layer in model.lora_layers() for ad in layer.adapters.values()}
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


# --- checkpoints --------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-able tensors plus JSON (checkpoints are never pickled)."""
    sd = opt.state_dict()
    tensors = {f"{pid}.{k}": (v if torch.is_tensor(v) else torch.tensor(v))
               for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(out: Path, step: int, model: LoraModel, opt, sched, config_text: str) -> Path:
    """Write checkpoints/step-N whole or not at all (temp dir + rename)."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    model.save_pretrained(tmp / "adapter")
    tensors, meta = _optimizer_tensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    save_tensors(tensors, tmp / "trainer_state.safetensors")
    save_json({"step": step, "optimizer": meta, "scheduler": sched.state_dict(), "config": config_text},
              tmp / "trainer_state.json")
    public_modes(tmp)
    final = root / f"step-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / CHECKPOINTS).glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: LoraModel, opt, sched, config_text: str) -> int:
    from .io import load_adapter_weights

    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state["config"] != config_text:
        raise TrainingError(f"checkpoint {ckpt} was made with a different config; run with --overwrite to "
                            "start over, or restore the config it was made with")
    load_adapter_weights(model, ckpt / "adapter", "default")
    tensors = load_file(ckpt / "trainer_state.safetensors")
    sd = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, v in tensors.items():
        if key == "rng.torch":
            continue
        pid, name = key.split(".", 1)
        sd["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(sd)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(state["step"])


def _check_output_dir(out: Path, config_text: str, overwrite: bool) -> None:
    """Refuse to mix two different runs in one output dir (read-only: nothing is written before setup works)."""
    saved = out / "run_config.yaml"
    old = saved.read_text() if saved.is_file() and not overwrite else config_text
    if old == config_text:
        return
    changed = _config_changes(old, config_text)
    raise TrainingError(f"{out} holds a run with a different config ({changed}); pass --overwrite to replace it "
                        "or choose another output_dir")


def _config_changes(old_text: str, new_text: str) -> str:
    """'train.lr: 0.001 -> 0.0002, ...' for the keys that differ between two dumped run configs."""
    def flat(d, prefix=""):
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    old, new = dict(flat(yaml.safe_load(old_text))), dict(flat(yaml.safe_load(new_text)))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
    return ", ".join(diffs[:5]) + (f" and {len(diffs) - 5} more" if len(diffs) > 5 else "") or "formatting"


def _claim_output_dir(out: Path, config_text: str, overwrite: bool) -> None:
    """Mark ``out`` as this run's (rank 0, once the model and data are set up)."""
    if overwrite:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.yaml").write_text(config_text)


def require_causal_lm(model, name: str) -> None:
    """loratune trains and generates with causal LMs; say so plainly for anything else (e.g. a BERT classifier)."""
    if not model.can_generate():
        raise LoraTuneError(f"model '{name}' is a {type(model).__name__}, not a causal language model; train, "
                            "eval, generate and chat need one (e.g. model=smollm2-135m-instruct). Classifiers are "
                            "fine-tuned through the Python API (LoraConfig(task_type='SEQ_CLS'))")


def _model_reference(name: str) -> str:
    """What the adapter records as its base: a bundled name as is, a local path made absolute."""
    from .base_models import BUNDLED

    return name if name in BUNDLED or not Path(name).exists() else str(Path(name).resolve())


# --- the loop -----------------------------------------------------------------------------------------
def train(cfg: RunConfig, overwrite: bool = False, model_and_tokenizer=None, data: PreparedData | None = None,
          progress: bool = True, stop_after: int | None = None) -> RunResult:
    """Fine-tune a LoRA adapter as ``cfg`` says; resumes from the latest checkpoint in ``output_dir``.

    ``stop_after`` ends the run after that many steps as if killed (tests of resume use it).
    """
    rank, world = _dist_setup()
    tc = cfg.train
    out = Path(cfg.output_dir)
    config_text = dump_run_config(cfg)
    _check_output_dir(out, config_text, overwrite)

    torch.manual_seed(tc.seed)
    model, tok = model_and_tokenizer or load_base_model(cfg.model)
    require_causal_lm(model, cfg.model)
    if data is None:
        data = prepare(cfg.data, tok, seed=tc.seed)
        if rank == 0 and progress:
            print("data\n  " + "\n  ".join(data.report_lines()), flush=True)
    torch.manual_seed(tc.seed)  # adapter init does not depend on what loading consumed
    lcfg = cfg.lora_config()
    lcfg.base_model_name_or_path = lcfg.base_model_name_or_path or _model_reference(cfg.model)
    lm = get_lora_model(model, lcfg)
    # Only now, with model, data and adapter config known to work, does the run take the output dir: a run that
    # fails validation leaves nothing behind that would block the corrected command.
    if rank == 0:
        _claim_output_dir(out, config_text, overwrite)
        (out / "data_report.txt").write_text("".join(line + "\n" for line in data.report_lines()))
    if world > 1:
        dist.barrier()
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()

    per_epoch, steps = total_steps(len(data.train), tc, world)
    per_step = tc.batch_size * tc.grad_accum * world
    opt = make_optimizer(lm, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.scheduler, int(tc.warmup_ratio * steps), steps))
    params = [p for p in lm.parameters() if p.requires_grad]

    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        start = load_checkpoint(ckpt, lm, opt, sched, config_text)
        if rank == 0:
            print(f"run already complete ({steps} steps); writing its outputs again" if start >= steps
                  else f"resuming from {ckpt} (step {start} of {steps})", flush=True)
    # torch's RNG drives dropout; the same seed on every rank would give every shard the same masks
    if world > 1 and start == 0:
        torch.manual_seed(tc.seed + 1000 * rank)

    log_path = out / "metrics.jsonl"
    history: list[dict] = [json.loads(line) for line in log_path.read_text().splitlines()] \
        if start and log_path.is_file() else []
    history = [h for h in history if h["step"] <= start]
    if rank == 0:  # drop lines a killed run logged after its last checkpoint
        log_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    pad = tok.pad_token_id
    bar = tqdm(total=steps, initial=start, disable=not progress or rank != 0, desc="train", dynamic_ncols=True)
    t0, tokens_seen = time.time(), 0
    step = start
    for step in range(start + 1, steps + 1):
        rows = global_batch(step - 1, len(data.train), per_epoch, per_step, tc.seed)
        n_tokens = sum(sum(1 for v in data.train[i].labels[1:] if v != -100) for i in rows)
        mine = rows[rank * tc.batch_size * tc.grad_accum:(rank + 1) * tc.batch_size * tc.grad_accum]
        step_loss = torch.zeros(())
        for k in range(0, len(mine), tc.batch_size):
            batch = collate([data.train[i] for i in mine[k:k + tc.batch_size]], pad)
            loss_sum, _ = response_loss_sum(lm, batch)
            (loss_sum / max(n_tokens, 1)).backward()
            step_loss += loss_sum.detach()
            tokens_seen += int(batch["attention_mask"].sum())
        if world > 1:
            dist.all_reduce(step_loss)
        loss = step_loss.item() / max(n_tokens, 1)
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {step}; lower train.lr (now {tc.lr}) or check the data")
        _all_reduce_grads(params, world)
        if tc.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        lr = sched.get_last_lr()[0]  # the rate this step uses (read before sched.step() moves on)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

        record = {"step": step, "loss": loss, "lr": lr,
                  "tokens_per_s": tokens_seen * world / max(time.time() - t0, 1e-9)}
        if data.eval and (step == steps or (tc.eval_every and step % tc.eval_every == 0)):
            record["eval_loss"] = eval_loss(lm, data.eval, pad, tc.eval_batch_size)["loss"]
        history.append(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            # The last step is always checkpointed: rerunning a finished command then has nothing left to do.
            if step == steps or (tc.save_every and step % tc.save_every == 0):
                save_checkpoint(out, step, lm, opt, sched, config_text)
        if stop_after is not None and step - start >= stop_after:
            break
    bar.close()
    fused.clear_mask_cache()  # let go of the last input's x⊙mask: evaluation and merging need none
    losses.release_workspace()  # and of the loss's kept chunk × vocab buffer
    if stop_after is not None and step - start >= stop_after:  # stopped early (as if killed): no adapter yet
        return RunResult(lm, tok, data, out / "adapter", history, step, time.time() - t0)

    adapter_dir = out / "adapter"
    if rank == 0:
        lm.save_pretrained(adapter_dir)
        if cfg.data.chat_template:
            tok.chat_template = cfg.data.chat_template
        tok.save_pretrained(adapter_dir)  # the chat template travels with the adapter
        save_json({"system_prompt": cfg.data.system_prompt}, adapter_dir / PROMPT_FILE)
        write_loss_curve(history, out / "loss_curve.png")
    if world > 1:
        dist.barrier()
    return RunResult(lm, tok, data, adapter_dir, history, step, time.time() - t0)


def write_loss_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train")
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
