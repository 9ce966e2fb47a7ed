"""The run config: a YAML file with flat sections (model, data, lora, train, output_dir) plus overrides.

``model`` may be a name (``model: NAME``) or a section (``model: {name: NAME, quantize: nf4}``); a dotted override
such as ``model.quantize=nf4`` applies to either form (sections.py holds the model and train sections).

Every key is checked: unknown keys get the valid name they most likely mean (a table of names users bring
from transformers, PEFT, axolotl and LLaMA-Factory first, then the closest spelling), values of the wrong
type say which type is wanted and give an example. All problems are reported together in one ConfigError.
``lora`` accepts the short names ``alpha``/``dropout`` and any LoraConfig field by its own name; giving a
short name and its long name with different values is an error.
"""

from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import quant
from ..adapters.config import LoraConfig
from ..data import DataConfig, check_data_file
from ..errors import ConfigError, ConfigWarning, DataError, LoraTuneError, closest
from .sections import AUTO, ModelConfig, TrainConfig
from .synonyms import SECTION_SYNONYMS, SYNONYMS
from .validate import BAD, as_yaml, checked

__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "build_run_config", "dump_run_config", "load_run_config"]


LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
LORA_SHORT = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def lora_defaults() -> dict[str, Any]:
    """What a ``lora`` key means when the config does not give it (LoraConfig's defaults, then a run's own)."""
    return {**{f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING},
            **LORA_DEFAULTS}

_EXAMPLES = {"train.epochs": 1, "train.max_steps": 100, "train.loraplus_lr_ratio": 16,
             "data.train": "data/train.jsonl", "data.eval": "data/eval.jsonl",
             "data.system_prompt": "Answer briefly.", "data.chat_template": "path/to/template.jinja"}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train=""))
    lora: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/latest"
    task: str = "causal_lm"  # or classification: an encoder with a classification head (training/classify.py)

    def lora_config(self) -> LoraConfig:
        kwargs = dict(LORA_DEFAULTS)
        kwargs.update({LORA_SHORT.get(k, k): v for k, v in self.lora.items()})
        kwargs.setdefault("task_type", TASK_TYPES[self.task])
        return LoraConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "lora", "train", "output_dir", "task")
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}  # run config task -> PEFT task_type


def load_run_config(path: str | Path | None, overrides: list[str] = (), defaults: list[str] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply ``section.key=value`` overrides, validate everything.

    ``defaults`` are overrides applied first, as if written in the file (a preset such as the quickstart's).
    An override of ``lora.alpha`` replaces a ``lora_alpha`` from the file (and the other way round), as an
    override of the same key would; both given in the file, or both as overrides, must agree.
    """
    raw: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    problems: list[str] = []
    for layer in (defaults, overrides):
        overridden: set[str] = set()
        for item in layer:
            problem = _apply_override(raw, item, overridden)
            if problem:
                problems.append(problem)
    return build_run_config(raw, problems)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass the YAML file itself (see examples/dates.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; see examples/ for one to copy")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8); a config is YAML text, see examples/dates.yaml"
                          ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    return raw


def _apply_override(raw: dict[str, Any], item: str, overridden: set[str]) -> str | None:
    """Set one ``section.key=value`` in ``raw``; returns the problem, if any."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        return f"override {item!r} must look like section.key=value, e.g. lora.r=32"
    *parents, leaf = key.split(".")
    if parents[:1] == ["model"] and isinstance(raw.get("model"), str):
        raw["model"] = {"name": raw["model"]}  # the short form `model: NAME` opens into its section
    if not parents and leaf == "model" and isinstance(raw.get("model"), dict):
        parents, leaf = ["model"], "name"  # model=NAME renames the base, keeping the section's other keys
    node = raw
    for part in parents:
        if node.get(part) is None:  # a section left empty in the YAML reads as null
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            return f"override {item!r}: '{part}' holds a single value, not a section; set it as {part}=..."
    if parents == ["lora"]:
        partner = _alias_partner(leaf)
        if partner in node and f"lora.{partner}" not in overridden:
            del node[partner]  # the override replaces the file's value under the other name
    overridden.add(key)
    node[leaf] = _parse_value(value)
    return None


def _parse_value(value: str) -> Any:
    """A YAML scalar/list/mapping; text that is not valid YAML (``a: b: c``) is taken as a plain string."""
    if not value:
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _alias_partner(key: str) -> str | None:
    """``lora_alpha`` for ``alpha`` and the other way round; None for a key without a short name."""
    return LORA_SHORT.get(key) or next((short for short, full in LORA_SHORT.items() if full == key), None)


# The keys that take ``auto`` (loratune chooses: training/lr_search.py, optim.auto_steps, data.held_out_count).
AUTO_KEYS = ("train.lr", "train.epochs", "data.eval_split")
# What a classification run (training/classify.py, its own loop) gets instead of auto (and one epoch unless
# max_steps is given): the loop that resolves auto is the causal-LM one.
_CLASSIFY_DEFAULTS = {"train": {"lr": 2e-4}, "data": {"eval_split": 0.0}}


def build_run_config(raw: dict[str, Any], problems: list[str] | None = None) -> RunConfig:
    """Validate every section of ``raw``; all problems (plus those passed in) are raised as one ConfigError."""
    problems = list(problems or [])
    sections = _check_sections(raw, problems)
    lora = _lora_section(sections["lora"], problems)
    causal = raw.get("task", RunConfig.task) == "causal_lm"
    data = _section("data", DataConfig, sections["data"], problems,
                    fill={"train": "", "eval_split": AUTO if causal else 0.0})
    train_fill = None if causal else {**_CLASSIFY_DEFAULTS["train"],
                                      **({} if "max_steps" in sections["train"] else {"epochs": 1.0})}
    train = _section("train", TrainConfig, sections["train"], problems, fill=train_fill)
    model = _model_section(raw.get("model"), problems)
    output_dir = checked("output_dir", raw.get("output_dir", RunConfig.output_dir), str, RunConfig.output_dir,
                          problems, _EXAMPLES)
    _check_data_files(sections["data"], problems)
    task = raw.get("task", RunConfig.task)
    if task not in TASK_TYPES:
        problems.append(f"task must be one of {', '.join(TASK_TYPES)}, got {task!r}{closest(str(task), TASK_TYPES)} "
                        "(causal_lm: a chat/completion model; classification: an encoder with a label head)")
    if model is not None and model.quantize:
        try:
            quant.check_skip_vs_targets(model.quantize_skip_modules, lora.get("target_modules"))
        except ConfigError as e:
            problems.append(f"model.quantize_skip_modules: {e}")
    if problems:
        raise ConfigError(_report(problems))
    _warn_if_steps_and_epochs(train)
    return RunConfig(model=model, data=data, lora=lora, train=train, output_dir=output_dir, task=task)


def _report(problems: list[str]) -> str:
    """One problem as one line; several as a count and one indented line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


def _check_sections(raw: dict[str, Any], problems: list[str]) -> dict[str, dict[str, Any]]:
    """The data/lora/train mappings of ``raw`` (empty when missing); unknown or malformed sections are problems."""
    for k in raw:
        if k not in SECTIONS:
            problems.append(f"unknown config section '{k}'{_section_hint(k)}")
    sections = {}
    for name in ("data", "lora", "train"):  # (model may also be a plain name: _model_section checks it)
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            problems.append(f"config section '{name}' must be a mapping of keys (e.g. {name}.{_first_key(name)}=...), "
                            f"got {value!r}")
        sections[name] = value if isinstance(value, dict) else {}
    return sections


def _model_section(value: Any, problems: list[str]) -> ModelConfig | None:
    """``model: NAME`` or ``model: {name: ..., quantize: ...}`` as a ModelConfig (None when it has problems)."""
    if value is None:
        return ModelConfig()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        problems.append(f"'model' must be a model name or path, or a mapping such as {{name: ..., quantize: nf4}}, "
                        f"got {value!r}; e.g. model={ModelConfig.name}")
        return None
    return _section("model", ModelConfig, value, problems)


def _first_key(name: str) -> str:
    return {"data": "train", "lora": "r", "train": "lr"}[name]


def _section_hint(key: str) -> str:
    """' (did you mean ...)' for an unknown top-level key: a section's synonym, or a key that belongs in a section."""
    norm = key.lower().replace("-", "_")
    if norm in SECTION_SYNONYMS:
        return f" (did you mean '{SECTION_SYNONYMS[norm]}'?)"
    for section, keys in (("train", _field_names(TrainConfig)), ("data", _field_names(DataConfig)),
                          ("model", _field_names(ModelConfig) - {"name"}),
                          ("lora", _field_names(LoraConfig) | set(LORA_SHORT))):
        target = SYNONYMS[section].get(norm, norm)
        if target in keys:
            return f" (keys go under their section: did you mean '{section}.{target}'?)"
    return closest(key, SECTIONS)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unknown_key(section: str, key: str, valid: typing.Iterable[str]) -> str:
    return f"unknown key '{section}.{key}'{closest(key, valid, SYNONYMS.get(section))}"


def _section(name: str, cls: type, values: dict[str, Any], problems: list[str],
             fill: dict[str, Any] | None = None):
    """``cls`` built from ``values``, or None; each unknown key, bad type and invalid value is a problem.

    Keys with a problem are left out so that the others are still checked; ``fill`` supplies required fields.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        if k not in fields:
            problems.append(_unknown_key(name, k, fields))
            continue
        if v == AUTO and f"{name}.{k}" not in AUTO_KEYS:
            problems.append(_not_auto(f"{name}.{k}", fields[k].default))
            continue
        if v == AUTO and fill and k in fill and fill[k] != AUTO:  # (task: classification)
            problems.append(f"{name}.{k}=auto is for task causal_lm (classification has its own loop); "
                            f"give a value, e.g. {name}.{k}={as_yaml(fill[k])}")
            continue
        kwargs[k] = checked(f"{name}.{k}", v, hints[k], fields[k].default, problems, _EXAMPLES)
        if kwargs[k] is BAD:
            del kwargs[k]
    for k, v in (fill or {}).items():
        kwargs.setdefault(k, v)
    try:
        return cls(**kwargs)
    except LoraTuneError as e:
        problems.extend(_split(str(e), [f"{name}."]))
        return None


def _not_auto(key: str, default: Any) -> str:
    example = f", e.g. {key}={as_yaml(default)}" if default not in (None, dataclasses.MISSING, AUTO) else ""
    return f"{key} does not take auto (the keys that do: {', '.join(AUTO_KEYS)}); give a value{example}"


def _lora_section(values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The ``lora`` mapping with types checked and aliases merged; LoraConfig's own problems are added too."""
    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    hints = typing.get_type_hints(LoraConfig)
    lora: dict[str, Any] = {}
    for k, v in values.items():
        name = LORA_SHORT.get(k, k)
        if name not in fields:
            problems.append(_unknown_key("lora", k, set(fields) | set(LORA_SHORT)))
            continue
        if v == AUTO:
            problems.append(_not_auto(f"lora.{k}", LORA_DEFAULTS.get(name, fields[name].default)))
            continue
        typed = checked(f"lora.{k}", v, hints[name], LORA_DEFAULTS.get(name, fields[name].default), problems,
                        _EXAMPLES)
        if typed is not BAD:
            lora[k] = typed if isinstance(v, str) else v  # keep 32 as 32 (not 32.0): it is written to files
    n_before = len(problems)
    _merge_aliases(lora, problems)
    if len(problems) == n_before:
        try:
            RunConfig(lora=lora).lora_config()  # validate now, not after the model has loaded
        except LoraTuneError as e:
            problems.extend(_lora_problems(str(e), lora))
    return lora


def _lora_problems(message: str, lora: dict[str, Any]) -> list[str]:
    """LoraConfig's '; '-joined problems, one each, named by the key the user wrote (``lora.dropout``)."""
    names = sorted(_field_names(LoraConfig), key=len, reverse=True)
    message = message.removeprefix("invalid LoraConfig: ")
    short = {full: short for short, full in LORA_SHORT.items() if short in lora}
    out = []
    for problem in _split(message, [f"{n} " for n in names] + [f"{n}[" for n in names]):
        name = next((n for n in names if problem.startswith((f"{n} ", f"{n}["))), None)
        out.append(f"lora.{short.get(name, name)}{problem[len(name):]}" if name else f"lora: {problem}")
    return out


def _split(message: str, starts: list[str]) -> list[str]:
    """Split a '; '-joined list of problems where the next part begins with one of ``starts``."""
    return re.split("; (?=" + "|".join(map(re.escape, starts)) + ")", message)


def _merge_aliases(lora: dict[str, Any], problems: list[str]) -> None:
    """Keep one of ``alpha``/``lora_alpha`` (and the like) when both are given; a problem if they disagree."""
    for short, full in LORA_SHORT.items():
        if short in lora and full in lora:
            if lora[short] == lora[full]:
                del lora[short]
            else:
                problems.append(f"lora.{short}={as_yaml(lora[short])} and lora.{full}={as_yaml(lora[full])} disagree "
                                f"({short} is short for {full}); give only one of them")


def _check_data_files(data: dict[str, Any], problems: list[str]) -> None:
    """data.train is required and data files must exist: fail before a model is loaded, not after."""
    if not data.get("train"):
        problems.append("data.train is required: the path of a jsonl/json/csv/parquet training file, "
                        "e.g. data.train=data/train.jsonl")
    for key in ("train", "eval"):
        f = data.get(key)
        if f and isinstance(f, str):
            try:
                check_data_file(f, f"data.{key}: data file")
            except DataError as e:
                problems.append(str(e))


def _warn_if_steps_and_epochs(train: TrainConfig) -> None:
    """max_steps silently winning over epochs surprises people: say so when both were given."""
    if train.max_steps is not None and train.epochs is not None and train.epochs != AUTO:
        warnings.warn(f"train.max_steps={train.max_steps} and train.epochs={as_yaml(train.epochs)} are both set: "
                      "max_steps wins and epochs is ignored; set only one (train.max_steps=null to train by epochs)",
                      ConfigWarning, stacklevel=4)


# Where and how a run computes, not what: a run may resume on another device, with another number of processes,
# sharded or not, compiled or not (checkpoints are device-free; the global batch is the same). Left out of
# run_config.yaml, which is what a resumed run must match; so is model.dtype at its default (float32), which keeps
# the run configs written before it existed valid.
_HOW = {"train": ("device", "distributed", "compile", "report_to")}
_SAME_AS_BEFORE = {"model": {"dtype": "float32"}, "train": {"class_weights": None},
                   "data": {"text_column": "text", "text_pair_column": None, "label_column": "label"}}


def dump_run_config(cfg: RunConfig) -> str:
    """The run's config as YAML: what ``run_config.yaml`` holds and a resumed run is compared with."""
    d = cfg.to_dict()
    for section, keys in _HOW.items():
        for k in keys:
            d[section].pop(k, None)
    for section, defaults in _SAME_AS_BEFORE.items():
        for k, v in defaults.items():
            if k in d[section] and d[section][k] == v:
                del d[section][k]
    if d["task"] == RunConfig.task:
        del d["task"]
    return yaml.safe_dump(d, sort_keys=False)
