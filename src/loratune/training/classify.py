"""Sequence classification (``task: classification``): an encoder with a label head, LoRA on the encoder's linears
and the head trained in full (``modules_to_save``, as PEFT's ``task_type="SEQ_CLS"`` does).

The loop is the causal-LM loop's little sibling and shares its parts: the seeded order of rows (``optim``), the
checkpoints (``checkpoints``: a killed run resumes from the last one, bit for bit), the run directory's policy
(``rundir``) and the metrics log (``tracking.RunLog``). Each step's loss is the (class-weighted) cross-entropy of
the global batch: the weighted sum over its rows divided by their summed weight, whatever grad_accum splits it
into. It runs on one process (no torchrun): encoders are small.

The adapter directory holds PEFT's adapter files, the tokenizer, ``loratune_labels.json`` (the label of each class
id, the columns read) and ``loratune_prompt.json`` (the base by loratune's name).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import devices, settings
from ..adapters import LoraModel, get_lora_model
from ..adapters.files import PROMPT_NAME, load_adapter_weights
from ..data.labels import LabelledData, LabelledRow, LabelSet, balanced_weights, prepare_labelled
from ..errors import ConfigError, ConfigWarning, LoraTuneError
from ..fsutil import atomic_dir, save_json, write_text
from ..models import BUNDLED, base_reference, load_base_model, resolve_model_path
from .checkpoints import (
    TrainingError,
    check_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import RunConfig, dump_run_config
from .optim import global_batch, lr_lambda, make_optimizer, total_steps
from .rundir import check_output_dir, claim_output_dir, past_length, read_history, write_loss_curve
from .tracking import RunLog, check_trackers


@dataclass
class ClassifierResult:
    model: LoraModel
    tokenizer: object
    data: LabelledData
    adapter_dir: Path
    history: list[dict]
    steps: int
    seconds: float


def check_encoder(name: str) -> None:
    """Refuse a base that is a decoder-only causal LM (SmolLM2, Llama, GPT-2, a .gguf file): ``task:
    classification`` trains an encoder's label head. Reads only config.json."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

    fix = ("task: classification needs an encoder (e.g. model=all-minilm-l6-v2, or a BERT/RoBERTa/DeBERTa model "
           "directory); use task: causal_lm to fine-tune this model to generate text")
    if name in BUNDLED and BUNDLED[name].task != "seq-cls" or str(name).endswith(".gguf"):
        raise ConfigError(f"model '{name}' is a causal language model (a chat model), not an encoder; {fix}")
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as e:
        raise LoraTuneError(f"cannot read the config of model '{name}' ({str(e).splitlines()[0]}); check that it is "
                            "a transformers model directory") from None
    archs = getattr(config, "architectures", None) or []
    decoder = (any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
               or (config.model_type in CAUSAL and config.model_type not in MASKED))
    if decoder or getattr(config, "is_decoder", False):
        kind = archs[0] if archs else config.model_type
        raise ConfigError(f"model '{name}' is a decoder-only causal language model ({kind}), not an encoder; {fix}")


def load_classifier(name: str, labels: LabelSet, dtype="float32", device="cpu"):
    """(model, tokenizer): base ``name`` as a sequence classifier with a fresh head for ``labels`` (transformers
    initialises it from torch's generator: seed it first for a repeatable head)."""
    from transformers.utils import logging as hf_logging

    check_encoder(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report says the head is new: here it is meant to be
    try:  # (ignore_mismatched_sizes: a base that has a head for another number of labels gets a fresh one too)
        model, tok = load_base_model(name, task="seq-cls", dtype=dtype, device=device, ignore_mismatched_sizes=True,
                                     num_labels=len(labels.labels), id2label=labels.id2label(),
                                     label2id={v: k for k, v in labels.id2label().items()})
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.pad_token is None:
        raise LoraTuneError(f"the tokenizer of model '{name}' has no padding token; classification pads batches: "
                            "give it one (tokenizer.pad_token) and save it with the model")
    model.config.pad_token_id = tok.pad_token_id  # (a classifier without it cannot find the last token of a row)
    return model, tok


def encode(tok, rows: list[LabelledRow], max_len: int, device: torch.device | None = None) -> dict:
    """Padded model inputs for ``rows`` (text, or text pairs), each cut to ``max_len`` tokens."""
    texts = [r.text for r in rows]
    pairs = [r.pair for r in rows] if rows and rows[0].pair is not None else None
    batch = tok(texts, pairs, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return devices.to_device(dict(batch), device) if device is not None else dict(batch)


def class_weights(spec, train_ids: list[int], labels: LabelSet) -> torch.Tensor | None:
    """``train.class_weights`` as a tensor: None, "balanced" (n / (k × count)) or one number per label."""
    k = len(labels.labels)
    if spec is None:
        return None
    if spec == "balanced":
        return torch.tensor(balanced_weights(train_ids, k), dtype=torch.float32)
    if len(spec) != k:
        raise ConfigError(f"train.class_weights has {len(spec)} number(s) but the training data has {k} labels "
                          f"({', '.join(map(str, labels.labels))}, in this order); give one weight per label, or "
                          "balanced")
    return torch.tensor([float(w) for w in spec], dtype=torch.float32)


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of weight × cross-entropy, sum of the rows' weights), in float32: divided, they give
    ``F.cross_entropy(weight=...)``'s mean, and partial sums add up across micro-batches."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    w = torch.ones_like(losses) if weights is None else weights.to(losses.device)[targets]
    return (losses * w).sum(), w.sum()


@torch.no_grad()
def predict_logits(model, tok, rows: list[LabelledRow], batch_size: int, max_len: int,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """float32 logits (n × labels) of ``rows`` on the CPU, in eval mode, ``batch_size`` rows at a time."""
    was_training = model.training
    model.eval()
    device = devices.model_device(model)
    out = []
    for i in range(0, len(rows), batch_size):
        out.append(model(**encode(tok, rows[i:i + batch_size], max_len, device)).logits.float().cpu())
        if progress is not None:
            progress(len(rows[i:i + batch_size]))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.config.num_labels)


def check_classification_run(cfg: RunConfig) -> None:
    """What the classification loop does not do, refused before anything loads."""
    if settings.get().world_size > 1:
        raise TrainingError("task: classification runs in one process (encoders are small); start it without "
                            "torchrun")
    if cfg.model.quantize:
        raise ConfigError("model.quantize is not supported with task: classification (encoders are small enough "
                          "to train in full precision); drop model.quantize")
    if cfg.train.compile:
        raise ConfigError("train.compile is not supported with task: classification; set train.compile=false")
    if cfg.train.patience or cfg.train.keep_best:  # (epochs: auto's early stopping lives in the causal-LM loop)
        raise ConfigError("train.early_stopping_patience and train.load_best are not supported with task: "
                          "classification yet; drop them (the run logs eval_accuracy at every train.eval_every)")


def train_classifier(cfg: RunConfig, overwrite: bool = False, progress: bool = True, model_and_tokenizer=None,
                     stop_after: int | None = None) -> ClassifierResult:
    """Fine-tune a LoRA classifier as ``cfg`` says; resumes from the latest checkpoint in ``output_dir``.

    ``model_and_tokenizer``: a classifier already loaded (its head must have one output per label of the data);
    ``stop_after`` ends the run after that many steps as if killed (the tests of resume use it).
    """
    check_classification_run(cfg)
    tc = cfg.train
    device = devices.resolve_device(tc.device, key="train.device")
    dtype = devices.resolve_dtype(cfg.model.dtype, device, key="model.dtype")
    out = Path(cfg.output_dir)
    config_text = dump_run_config(cfg)
    check_output_dir(out, config_text, overwrite)
    check_trackers(tc.report_to)
    data = prepare_labelled(cfg.data, seed=tc.seed)
    weights = class_weights(tc.class_weights, data.train_ids, data.labels)
    if not data.eval:  # (classification keeps eval_split 0: its defaults predate data.eval_split auto)
        warnings.warn("task classification: no eval rows, so no held-out accuracy or eval loss; give data.eval, "
                      "or data.eval_split=0.1 to hold out a tenth of the rows", ConfigWarning, stacklevel=2)
    if progress:
        print("data\n  " + "\n  ".join(data.report), flush=True)
    torch.manual_seed(tc.seed)  # the fresh head's initial weights
    model, tok = model_and_tokenizer or load_classifier(cfg.model.name, data.labels, dtype, device)
    model.to(device)
    if model.config.num_labels != len(data.labels.labels):
        raise ConfigError(f"the model has {model.config.num_labels} outputs but the data has "
                          f"{len(data.labels.labels)} labels; load it with num_labels={len(data.labels.labels)}")
    torch.manual_seed(tc.seed)  # adapter init does not depend on what loading consumed
    lcfg = cfg.lora_config()
    if not lcfg.base_model_name_or_path:  # a path PEFT's AutoPeftModel resolves (the bundled model's own folder)
        lcfg.base_model_name_or_path = base_reference(cfg.model.name)
    lm = get_lora_model(model, lcfg)
    claim_output_dir(out, config_text, overwrite)  # only now: model, data and adapter config are known to work
    write_text(out / "data_report.txt", "".join(line + "\n" for line in data.report))
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()

    per_epoch, steps = total_steps(len(data.train), tc, 1)
    per_step = tc.batch_size * tc.grad_accum
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        check_checkpoint(ckpt, config_text)
        load_adapter_weights(lm, ckpt / "adapter", "default")
    opt = make_optimizer(lm, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.scheduler, int(tc.warmup_ratio * steps), steps))
    params = [p for p in lm.parameters() if p.requires_grad]
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, lm, opt, sched, config_text, adapter=False)
        if start > steps:  # (a config that differs only in its length extends the run: checkpoints.py)
            raise past_length(out, start, steps)
        if progress:
            print(f"run already complete ({steps} steps); writing its outputs again" if start >= steps
                  else f"resuming from {ckpt} (step {start} of {steps})", flush=True)
    log = RunLog(out, read_history(out / "metrics.jsonl", start), start, steps, progress, 0, tc.report_to,
                 config=cfg.to_dict())
    max_len = cfg.data.max_seq_len
    t0, tokens_seen, step = time.time(), 0, start
    before = log.history[-1].get("time_s", 0.0) if log.history else 0.0  # training seconds of earlier sessions
    for step in range(start + 1, steps + 1):
        rows = global_batch(step - 1, len(data.train), per_epoch, per_step, tc.seed)
        targets = torch.tensor([data.train_ids[i] for i in rows])
        total_w = len(rows) if weights is None else float(weights[targets].sum())
        step_loss = 0.0
        for k in range(0, len(rows), tc.batch_size):
            part = rows[k:k + tc.batch_size]
            batch = encode(tok, [data.train[i] for i in part], max_len, device)
            loss_sum, _ = weighted_loss(lm(**batch).logits, targets[k:k + tc.batch_size].to(device), weights)
            (loss_sum / total_w).backward()
            step_loss += loss_sum.item()
            tokens_seen += int(batch["attention_mask"].sum())
        loss = step_loss / total_w
        if not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {step}; lower train.lr (now {tc.lr}) or check the data")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm or math.inf).item()
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.time() - t0
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_seen / max(now, 1e-9), "time_s": before + now}
        if data.eval and (step == steps or (tc.eval_every and step % tc.eval_every == 0)):
            record.update(eval_metrics(lm, tok, data, tc.eval_batch_size, max_len, weights))
        log.step(record)
        if step == steps or (tc.save_every and step % tc.save_every == 0):
            save_checkpoint(out, step, lm, opt, sched, config_text)
            prune_checkpoints(out, tc.keep_checkpoints)
        if stop_after is not None and step - start >= stop_after:
            break
    history = log.history
    if history and "eval_accuracy" in history[-1]:
        log.final({k: history[-1][k] for k in ("eval_loss", "eval_accuracy")})
    log.close()
    if stop_after is not None and step - start >= stop_after and step < steps:  # as if killed: no adapter yet
        return ClassifierResult(lm, tok, data, out / "adapter", history, step, time.time() - t0)
    adapter_dir = out / "adapter"
    save_classifier(lm, tok, data.labels, cfg.model.name, adapter_dir)
    write_loss_curve(history, out / "loss_curve.png")
    seconds = history[-1].get("time_s", time.time() - t0) if history else 0.0  # the run's, not this session's
    return ClassifierResult(lm, tok, data, adapter_dir, history, step, seconds)


def eval_metrics(lm, tok, data: LabelledData, batch_size: int, max_len: int,
                 weights: torch.Tensor | None = None) -> dict[str, float]:
    """``eval_loss`` (class-weighted as in training) and ``eval_accuracy`` of ``lm`` on ``data.eval``."""
    logits = predict_logits(lm, tok, data.eval, batch_size, max_len)
    targets = torch.tensor(data.eval_ids)
    loss_sum, w = weighted_loss(logits, targets, weights)
    return {"eval_loss": (loss_sum / w).item(), "eval_accuracy": (logits.argmax(-1) == targets).float().mean().item()}


def save_classifier(lm: LoraModel, tok, labels: LabelSet, base_name: str, directory: Path) -> None:
    """The adapter directory, whole or not at all: PEFT's files, the tokenizer, the labels, the base's name."""
    with atomic_dir(directory) as tmp:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        labels.save(tmp)
        save_json({"system_prompt": None, "base_model": base_name}, tmp / PROMPT_NAME)
