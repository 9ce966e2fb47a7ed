"""The run config: a YAML file with flat sections (model, data, lora, train, output_dir) plus overrides.

Every key is checked: unknown keys get the closest valid name, values of the wrong type say which type
is wanted. ``lora`` accepts the short names ``alpha``/``dropout`` and any LoraConfig field by its own name.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import LoraConfig
from .data import DataConfig
from .errors import ConfigError, closest


@dataclass
class TrainConfig:
    epochs: float | None = None  # default 1 when max_steps is not set either
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = no intermediate checkpoints
    loraplus_lr_ratio: float | None = None  # LoRA+: B learns this many times faster than A
    eval_batch_size: int = 32
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        p = []
        if self.scheduler not in ("cosine", "linear", "constant"):
            p.append(f"train.scheduler must be cosine, linear or constant, got {self.scheduler!r}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"train.max_steps must be ≥ 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            p.append(f"train.epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            p.append(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            p.append(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if p:
            raise ConfigError("; ".join(p))


LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LORA_SHORT = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


@dataclass
class RunConfig:
    model: str = "smollm2-135m-instruct"
    data: DataConfig = field(default_factory=lambda: DataConfig(train=""))
    lora: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/latest"

    def lora_config(self) -> LoraConfig:
        kwargs = dict(LORA_DEFAULTS)
        kwargs.update({LORA_SHORT.get(k, k): v for k, v in self.lora.items()})
        kwargs.setdefault("task_type", "CAUSAL_LM")
        return LoraConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "lora", "train", "output_dir")


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply ``section.key=value`` overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see examples/ for one to copy")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. lora.r=32")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(value) if value else ""
    return build_run_config(raw)


def build_run_config(raw: dict[str, Any]) -> RunConfig:
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise ConfigError("; ".join(f"unknown config section '{k}'{closest(k, SECTIONS)}" for k in unknown))
    for name in ("data", "lora", "train"):
        if not isinstance(raw.get(name, {}), dict):
            raise ConfigError(f"config section '{name}' must be a mapping of keys, got {raw[name]!r}")
    lora = dict(raw.get("lora") or {})
    valid_lora = sorted({f.name for f in dataclasses.fields(LoraConfig)} | set(LORA_SHORT))
    bad = [k for k in lora if k not in valid_lora]
    if bad:
        raise ConfigError("; ".join(f"unknown key 'lora.{k}'{closest(k, valid_lora)}" for k in bad))
    cfg = RunConfig(
        model=_typed("model", raw.get("model", RunConfig.model), str),
        data=_section("data", DataConfig, raw.get("data") or {}),
        lora=lora,
        train=_section("train", TrainConfig, raw.get("train") or {}),
        output_dir=_typed("output_dir", raw.get("output_dir", RunConfig.output_dir), str),
    )
    if not cfg.data.train:
        raise ConfigError("data.train is required: the path of a jsonl/json/csv/parquet training file")
    for key, f in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if f and not Path(f).is_file():  # fail before a model is loaded, not after
            raise ConfigError(f"{key}: data file {f} does not exist; check the path")
    cfg.lora_config()  # validate now, not after the model has loaded
    return cfg


def _section(name: str, cls: type, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    bad = [k for k in values if k not in fields]
    if bad:
        raise ConfigError("; ".join(f"unknown key '{name}.{k}'{closest(k, fields)}" for k in bad))
    kwargs = {k: _typed(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _typed(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently coerce: int -> float) a value against a field's annotation."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for t in options:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML reads "1e-4" (no dot) as a string
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool, list, dict) and isinstance(value, t):
            return value
        if t is Any:
            return value
    wanted = " or ".join(getattr(typing.get_origin(t) or t, "__name__", str(t)) for t in options)
    raise ConfigError(f"'{key}' must be {wanted}, got {type(value).__name__} {value!r}")


def dump_run_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
