"""The run config's typed sections: ``model`` (what base to load, and how) and ``train`` (the loop's settings).

Each validates itself in ``__post_init__`` and raises one ConfigError listing every problem, each named by its
dotted key (``train.lr``, ``model.quantize``), so that ``config.build_run_config`` can report them all at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import devices, quant
from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # NF4 compute dtypes, by their config names


@dataclass
class ModelConfig:
    """The base model. ``model: NAME`` in a config is short for ``model: {name: NAME}``.

    ``quantize: nf4`` stores every eligible linear of the base in 4-bit NormalFloat before LoRA is injected (QLoRA,
    docs/qlora.md), computing in ``compute_dtype``; ``quantize_skip_modules`` keeps more modules in full precision
    (the output head is always kept, as transformers does).

    ``dtype`` is the precision of the frozen base weights and activations (``devices.resolve_dtype``: auto picks
    bfloat16 on a GPU or CPU with fast bfloat16, float32 elsewhere); adapters stay float32 and the loss is float32.
    The default is float32, so that a config gives the same numbers on every machine; ask for auto or bfloat16.
    """
    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    quantize: str | None = None
    compute_dtype: str = "float32"
    quantize_skip_modules: list[str] | None = None

    def __post_init__(self) -> None:
        p = []
        try:
            self.quantize = quant.check_quantize(self.quantize)
        except ConfigError as e:
            p.append(f"model.{e}")
        try:
            devices.check_dtype_name(self.dtype, "model.dtype")
        except ConfigError as e:
            p.append(str(e))
        if self.compute_dtype not in DTYPES:
            p.append(f"model.compute_dtype must be one of {', '.join(DTYPES)}, got {self.compute_dtype!r}")
        skip = self.quantize_skip_modules
        if skip is not None and not all(isinstance(m, str) and m for m in skip):
            p.append(f"model.quantize_skip_modules must be a list of module names, got {skip!r} "
                     "(e.g. model.quantize_skip_modules=[lm_head])")
        elif skip and not self.quantize:
            p.append("model.quantize_skip_modules is set but model.quantize is not; set model.quantize=nf4 or drop "
                     "the skip list")
        if not self.name:
            p.append("model.name is empty; give a bundled name, a model directory or a .gguf file")
        if p:
            raise ConfigError("; ".join(p))

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``models.load_base_model`` for this section (besides the name)."""
        if not self.quantize:
            return {}
        return {"quantize": self.quantize, "compute_dtype": DTYPES[self.compute_dtype],
                "quantize_skip_modules": self.quantize_skip_modules}


TRACKERS = ("tensorboard", "wandb", "mlflow")


AUTO = "auto"


@dataclass
class TrainConfig:
    """The ``train`` section. ``lr: auto`` (the default) picks the rate by a short search before the run
    (training/lr_search.py); ``epochs: auto`` (the default when neither epochs nor max_steps is given) sets a step
    budget that grows with the data (optim.auto_steps), evaluates about ten times and stops early on eval loss.
    ``early_stopping_patience`` (evaluations without a new best eval loss; 0 = never stop early) and ``load_best``
    (the final adapter is the one of the best evaluation) default to on with ``epochs: auto`` and off otherwise."""
    epochs: float | str | None = None  # None: auto when max_steps is not set either
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | str = AUTO
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    loraplus_lr_ratio: float | None = None  # LoRA+: B learns this many times faster than A
    keep_checkpoints: int = 2  # how many step-N checkpoints to keep (the last one always)
    eval_batch_size: int = 32
    max_new_tokens: int = 32
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps (devices.resolve_device)
    distributed: str = "ddp"  # under torchrun: ddp (adapters replicated) or fsdp (FSDP2, the base sharded per layer)
    compile: bool = False  # torch.compile the model (inductor)
    report_to: list[str] | str | None = None  # metric trackers: tensorboard, wandb, mlflow (training/tracking.py)
    class_weights: list[float] | str | None = None  # task: classification: "balanced" or one weight per label
    early_stopping_patience: int | None = None  # None: 3 with epochs auto, else 0 (off)
    early_stopping_threshold: float | None = None  # None: 1e-3 with epochs auto, else 0 (any decrease counts)
    load_best: bool | None = None  # None: true with epochs auto, else false

    @property
    def auto_lr(self) -> bool:
        return self.lr == AUTO

    @property
    def auto_epochs(self) -> bool:
        """True when the run's length is chosen by loratune (epochs auto, or neither epochs nor max_steps)."""
        return self.max_steps is None and self.epochs in (None, AUTO)

    @property
    def patience(self) -> int:
        """Evaluations without a new best eval loss before the run stops (0: never)."""
        if self.early_stopping_patience is not None:
            return self.early_stopping_patience
        return 3 if self.auto_epochs else 0

    @property
    def threshold(self) -> float:
        """How much the best eval loss must fall (nats per token, from where it last did) to count as progress."""
        if self.early_stopping_threshold is not None:
            return self.early_stopping_threshold
        return 1e-3 if self.auto_epochs else 0.0

    @property
    def keep_best(self) -> bool:
        return self.load_best if self.load_best is not None else self.auto_epochs

    def __post_init__(self) -> None:
        p = []
        try:
            devices.check_device_name(self.device, "train.device")
        except ConfigError as e:
            p.append(str(e))
        if self.distributed not in ("ddp", "fsdp"):
            p.append(f"train.distributed must be ddp or fsdp, got {self.distributed!r} (fsdp shards the base model "
                     "over the processes of torchrun)")
        if self.scheduler not in ("cosine", "linear", "constant"):
            p.append(f"train.scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "seed"):
            if getattr(self, name) < 0:
                p.append(f"train.{name} must be ≥ 0, got {getattr(self, name)} (0 means: only at the end)"
                         if name != "seed" else f"train.seed must be ≥ 0, got {self.seed}")
        if self.keep_checkpoints < 1:
            p.append(f"train.keep_checkpoints must be ≥ 1 (the last checkpoint is always kept), got "
                     f"{self.keep_checkpoints}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"train.max_steps must be ≥ 1, got {self.max_steps}")
        if isinstance(self.epochs, str):
            if self.epochs != AUTO:
                p.append(f"train.epochs must be a number > 0 or auto, got {self.epochs!r} (e.g. train.epochs=1)")
        elif self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            p.append(f"train.epochs must be a finite number > 0, got {self.epochs}")
        if isinstance(self.lr, str):
            if self.lr != AUTO:
                p.append(f"train.lr must be a number > 0 or auto, got {self.lr!r} (e.g. train.lr=2e-4)")
        elif not (math.isfinite(self.lr) and self.lr > 0):
            p.append(f"train.lr must be a finite number > 0, got {self.lr} (e.g. train.lr=2e-4, or auto)")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 0:
            p.append(f"train.early_stopping_patience must be ≥ 0 (0 = never stop early), got "
                     f"{self.early_stopping_patience}")
        t = self.early_stopping_threshold
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            p.append(f"train.early_stopping_threshold must be a finite number ≥ 0 (the eval loss drop that counts as "
                     f"progress; 0 = any drop), got {t!r}")
        if not 0 <= self.warmup_ratio < 1:  # (NaN fails this too)
            p.append(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            p.append(f"train.weight_decay must be a finite number ≥ 0, got {self.weight_decay} (0 = none)")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            p.append(f"train.max_grad_norm must be a finite number ≥ 0, got {self.max_grad_norm} (0 = no clipping)")
        if isinstance(self.report_to, str):  # one tracker, or a comma-separated list as an override writes it
            self.report_to = [t.strip() for t in self.report_to.split(",")]
        if self.report_to is not None:
            self.report_to = [t for t in self.report_to if t not in ("", "none", None)] or None
        unknown = [t for t in self.report_to or [] if t not in TRACKERS]
        if unknown:
            p.append(f"train.report_to: unknown tracker {unknown[0]!r}; use any of {', '.join(TRACKERS)} (or none)")
        cw = self.class_weights
        if not (cw is None or cw == "balanced" or (isinstance(cw, list) and cw and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in cw))):
            p.append(f"train.class_weights must be null, balanced, or a list of numbers > 0 (one per label), got "
                     f"{cw!r}")
        if self.loraplus_lr_ratio is not None and not (math.isfinite(self.loraplus_lr_ratio)
                                                       and self.loraplus_lr_ratio > 0):
            p.append(f"train.loraplus_lr_ratio must be a finite number > 0 or null, got {self.loraplus_lr_ratio}")
        if p:
            raise ConfigError("; ".join(p))
