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
# AdaLoRA's own fields (PEFT's AdaLoraConfig); written to adapter_config.json for AdaLoRA adapters only.
ADALORA_FIELDS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")
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

    ``use_adalora`` makes the adapter PEFT's AdaLoRA (its ``AdaLoraConfig``, ``peft_type: ADALORA`` in the files;
    ``AdaLoraConfig`` below is this class with the switch on): ``init_r`` triplets per layer (``r`` is unused),
    pruned by the rank allocator to ``target_r`` per layer on average between ``tinit`` and
    ``total_step - tfinal`` (every ``deltaT`` steps), with ``beta1``/``beta2`` smoothing and ``orth_reg_weight``;
    ``rank_pattern`` then holds PEFT's kept-triplet masks (``{"<module>.lora_E": [bool] * init_r}``).
    ``total_step`` may be left None for a run of ``loratune train``: the run's step count fills it.
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
    rank_pattern: dict[str, Any] = field(default_factory=dict)  # int ranks; AdaLoRA: kept-triplet masks
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    # AdaLoRA (PEFT's AdaLoraConfig fields, same names and defaults)
    use_adalora: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self) -> None:
        # Normalise containers so that a set or tuple from user code behaves like PEFT's list.
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        for name in ("rank_pattern", "alpha_pattern"):  # PEFT's AdaLoRA writes null for "none"
            if getattr(self, name) is None:
                setattr(self, name, {})
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
        for key, value in self.rank_pattern.items() if not self.use_adalora else ():
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
        """This config as PEFT writes it to adapter_config.json (PEFT-only fields at their defaults): a LoraConfig,
        or with ``use_adalora`` an AdaLoraConfig (``peft_type: ADALORA``, its fields, no ``use_adalora`` key)."""
        d = dataclasses.asdict(self)
        d.update(_PEFT_UNSUPPORTED_DEFAULTS)
        d.update(peft_type="LORA", inference_mode=True, revision=None, auto_mapping=None,
                 megatron_core="megatron.core")
        del d["use_adalora"]
        if self.use_adalora:
            d.update(peft_type="ADALORA", rank_pattern=d["rank_pattern"] or None)
        else:
            for name in ADALORA_FIELDS:
                del d[name]
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
            elif key == "peft_type" and value == "ADALORA":
                kwargs["use_adalora"] = True
            elif key == "peft_type" and value != "LORA":
                problems.append(f"peft_type is {value!r}, but loratune loads LoRA adapters only (peft_type LORA or "
                                "ADALORA)")
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


def _check_keywords(cls: type) -> None:
    """Wrap ``cls``'s dataclass ``__init__`` so that a misspelt keyword is a ConfigError naming the closest field
    (it would otherwise surface as Python's bare TypeError with no hint)."""
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]

    def checked(self, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise ConfigError(f"{cls.__name__}: " + "; ".join(f"unknown key {k!r}{closest(k, names)}"
                                                            for k in unknown))
        init(self, *args, **kwargs)

    cls.__init__ = checked  # type: ignore[method-assign]


_check_keywords(LoraConfig)


@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's ``AdaLoraConfig``: a ``LoraConfig`` with ``use_adalora`` on (see LoraConfig for the fields)."""

    use_adalora: bool = True


_check_keywords(AdaLoraConfig)


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
    p.extend(_adalora_problems(c))
    return p


def _adalora_problems(c: LoraConfig) -> list[str]:
    """Problems with AdaLoRA's fields (``use_adalora`` and PEFT's AdaLoraConfig fields)."""
    if not isinstance(c.use_adalora, bool):
        return [f"use_adalora must be true or false, got {c.use_adalora!r}"]
    if not c.use_adalora:
        changed = [f.name for f in dataclasses.fields(LoraConfig) if f.name in ADALORA_FIELDS
                   and getattr(c, f.name) != f.default]
        return [f"{changed[0]} only applies with use_adalora: true (AdaLoRA's field{'s' if len(changed) > 1 else ''} "
                f"{', '.join(changed)} set); set use_adalora: true or remove {'them' if len(changed) > 1 else 'it'}"
                ] if changed else []
    p: list[str] = []
    for name in ("target_r", "init_r", "deltaT"):
        if not _is_int(getattr(c, name)) or getattr(c, name) < 1:
            p.append(f"{name} must be a positive integer, got {getattr(c, name)!r}")
    for name in ("tinit", "tfinal"):
        if not _is_int(getattr(c, name)) or getattr(c, name) < 0:
            p.append(f"{name} must be a non-negative integer (a number of steps), got {getattr(c, name)!r}")
    for name in ("beta1", "beta2"):
        if not _is_number(getattr(c, name)) or not 0 < getattr(c, name) < 1:
            p.append(f"{name} must be in (0, 1), got {getattr(c, name)!r} (PEFT's default: 0.85)")
    if not _is_number(c.orth_reg_weight) or not 0 <= c.orth_reg_weight < math.inf:
        p.append(f"orth_reg_weight must be a number >= 0, got {c.orth_reg_weight!r} (PEFT's default: 0.5)")
    if c.total_step is not None and (not _is_int(c.total_step) or c.total_step < 1):
        p.append(f"total_step must be a positive integer (the number of optimizer steps), got {c.total_step!r}")
    if p:
        return p
    if c.target_r > c.init_r:
        p.append(f"target_r ({c.target_r}) must not exceed init_r ({c.init_r}): AdaLoRA prunes from init_r down to "
                 "target_r triplets per layer")
    if c.total_step is not None:
        p.extend(schedule_problems(c, c.total_step))
    if c.use_dora:
        p.append("use_adalora cannot be combined with use_dora (PEFT's AdaLoRA has no DoRA); set one of them to false")
    if isinstance(c.init_lora_weights, str) and c.init_lora_weights != "gaussian":
        p.append(f"init_lora_weights={c.init_lora_weights!r} does not apply to AdaLoRA (its triplets start at E = 0, "
                 "A and B random); set init_lora_weights: true")
    if c.use_rslora:
        p.append("use_rslora does not apply to AdaLoRA (its scale is lora_alpha / the layer's rank); set "
                 "use_rslora: false")
    if c.alpha_pattern:
        p.append("alpha_pattern does not apply to AdaLoRA (PEFT's AdaLoRA uses lora_alpha everywhere); remove it")
    for key, mask in c.rank_pattern.items():
        if not isinstance(key, str) or not key.endswith(".lora_E") or not isinstance(mask, list) \
                or len(mask) != c.init_r or not all(isinstance(m, bool) for m in mask):
            p.append(f"rank_pattern[{key!r}] is not an AdaLoRA mask: with use_adalora, rank_pattern maps "
                     f"'<module>.lora_E' to init_r ({c.init_r}) true/false values, as the rank allocator writes it; "
                     "remove rank_pattern (the allocator fills it)")
            break
    return p


def schedule_problems(c: LoraConfig, total_step: int) -> list[str]:
    """The problem with AdaLoRA's schedule over ``total_step`` steps: no step left for the budget to fall."""
    if c.tinit + c.tfinal >= total_step:
        return [f"tinit + tfinal ({c.tinit} + {c.tfinal}) must be below total_step ({total_step}): AdaLoRA then "
                "has no steps to prune ranks in; lower tinit/tfinal or train for more steps"]
    return []


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
