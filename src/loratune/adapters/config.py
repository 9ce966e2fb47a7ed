"""``LoraConfig``: PEFT's field names and meanings, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, closest

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")

# PEFT config fields that loratune does not implement: loading an adapter that sets one of them to
# anything but its default would silently change the model, so it is refused instead.
_PEFT_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "lora_bias": False, "use_qalora": False, "layer_replication": None,
    "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
    "megatron_config": None,
}
# PEFT bookkeeping fields that carry no meaning for the adapter's math.
_PEFT_IGNORED = {
    "peft_type", "peft_version", "auto_mapping", "revision", "inference_mode", "megatron_core",
    "eva_config", "corda_config", "lora_ga_config", "velora_config", "qalora_group_size",
    "monteclora_config", "runtime_config", "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying",
}


@dataclass
class LoraConfig:
    """How to inject LoRA adapters into a model; the fields mean what they mean in PEFT.

    ``target_modules``: a list matches a module's full name or a dotted suffix of it, a str is a regex
    that must match the full name, ``"all-linear"`` is every Linear/Conv1D except the output head.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    use_dora: bool = False
    loftq_config: dict[str, Any] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        # Normalise containers so that a set or tuple from user code behaves like PEFT's list.
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        problems = self._problems()
        if problems:
            raise ConfigError("invalid LoraConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p: list[str] = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            p.append(f"r must be a positive integer, got {self.r!r} (use e.g. r=8)")
        if not _is_number(self.lora_alpha) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            p.append(f"lora_alpha must be a positive number, got {self.lora_alpha!r} (use e.g. lora_alpha=16)")
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            p.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r} (use e.g. 0.05)")
        if self.target_modules is None:
            p.append('target_modules is required (a list of module names, a regex, or "all-linear")')
        elif not _is_names(self.target_modules):
            p.append(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")
        elif self.target_modules != "all-linear":
            p.extend(_regex_problems("target_modules", self.target_modules))
        if self.exclude_modules is not None and not _is_names(self.exclude_modules):
            p.append(f"exclude_modules must be a list of names or a regex string, got {self.exclude_modules!r}")
        elif self.exclude_modules is not None:
            p.extend(_regex_problems("exclude_modules", self.exclude_modules))
        if self.bias not in BIAS_MODES:
            p.append(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        p.extend(_variant_problems(self))
        if self.layers_to_transform is not None and not (
            _is_int(self.layers_to_transform)
            or (isinstance(self.layers_to_transform, list) and all(map(_is_int, self.layers_to_transform)))
        ):
            p.append(f"layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            p.append("layers_pattern only applies with layers_to_transform; set both or neither")
        for name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, name), dict):
                p.append(f"{name} must be a mapping of module-name patterns to values, got {getattr(self, name)!r}")
                setattr(self, name, {})
        for key, value in self.rank_pattern.items():
            if not _is_int(value) or value <= 0:
                p.append(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
            p.extend(_regex_problems(f"rank_pattern key {key!r}", str(key)))
        for key, value in self.alpha_pattern.items():
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                p.append(f"alpha_pattern[{key!r}] must be a positive number, got {value!r}")
            p.extend(_regex_problems(f"alpha_pattern key {key!r}", str(key)))
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and all(isinstance(m, str) for m in self.modules_to_save)
        ):
            p.append(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            p.append(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        return p

    # --- PEFT's adapter_config.json -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """This config as PEFT writes it to adapter_config.json (PEFT-only fields at their defaults)."""
        d = dataclasses.asdict(self)
        d.update(_PEFT_UNSUPPORTED_DEFAULTS)
        d.update(peft_type="LORA", inference_mode=True, revision=None, auto_mapping=None,
                 megatron_core="megatron.core")
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> LoraConfig:
        """Build from a dict such as adapter_config.json; unknown or unsupported keys are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, problems = {}, []
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key in _PEFT_UNSUPPORTED_DEFAULTS:
                if value not in (_PEFT_UNSUPPORTED_DEFAULTS[key], {}, []):
                    problems.append(f"{key}={value!r} is a PEFT feature loratune does not support yet")
            elif key == "peft_type" and value != "LORA":
                problems.append(f"peft_type is {value!r}, but loratune loads LoRA adapters only")
            elif key not in _PEFT_IGNORED:
                problems.append(f"unknown key {key!r}{closest(key, names)}")
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> LoraConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, or not JSON
            raise ConfigError(f"cannot read {path}: {e}; re-save the adapter") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object; re-save the adapter")
        return cls.from_dict(d, source=str(path))


_dataclass_init = LoraConfig.__init__


def _checked_init(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
    # A misspelt keyword would otherwise surface as Python's bare TypeError with no hint.
    names = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ConfigError("LoraConfig: " + "; ".join(f"unknown key {k!r}{closest(k, names)}" for k in unknown))
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _checked_init  # type: ignore[method-assign]


_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def _variant_problems(c: LoraConfig) -> list[str]:
    """Problems with the variant fields: ``use_dora``, ``init_lora_weights``, ``loftq_config``."""
    p: list[str] = []
    init = c.init_lora_weights
    if not isinstance(c.use_dora, bool):
        p.append(f"use_dora must be true or false, got {c.use_dora!r}")
    if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora", "loftq")
            or (isinstance(init, str) and _NITER.fullmatch(init))):
        hint = " (K, the number of fast-SVD iterations, is a positive integer: e.g. pissa_niter_4)" \
            if isinstance(init, str) and init.startswith("pissa_niter") else ""
        p.append(f'init_lora_weights must be true, false, "gaussian", "pissa", "pissa_niter_K", "olora" or '
                 f'"loftq", got {init!r}{hint}')
    if not isinstance(c.loftq_config, dict):
        p.append(f"loftq_config must be a mapping such as {{loftq_bits: 4, loftq_iter: 1}}, got {c.loftq_config!r}")
    elif init == "loftq":
        bits, iters = c.loftq_config.get("loftq_bits"), c.loftq_config.get("loftq_iter", 1)
        if bits != 4:
            p.append(f"loftq_config must set loftq_bits: 4 for init_lora_weights=loftq (LoftQ quantizes the base to "
                     f"4-bit NF4, loratune's only quantization), got loftq_bits={bits!r}")
        if not _is_int(iters) or iters < 1:
            p.append(f"loftq_config needs loftq_iter to be a positive integer (e.g. 1), got {iters!r}")
        unknown = sorted(set(c.loftq_config) - {"loftq_bits", "loftq_iter"})
        if unknown:
            p.append(f"loftq_config has unknown key(s) {unknown}; it takes loftq_bits and loftq_iter")
    elif c.loftq_config:
        p.append(f'loftq_config only applies with init_lora_weights="loftq" (it is {init!r}); remove loftq_config')
    return p


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _regex_problems(what: str, spec: list[str] | str) -> list[str]:
    """A problem for a string that is not a valid regex (a list of names is matched literally: no problem)."""
    if not isinstance(spec, str):
        return []
    try:
        re.compile(spec)
    except re.error as e:
        return [f"{what} is not a valid regular expression ({e}): fix the pattern, or give a list of module "
                f"names instead, e.g. [q_proj, v_proj]"]
    return []


def _is_names(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
