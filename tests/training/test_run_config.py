"""The run config's checks: alias pairs, 'did you mean' for names from other tools, every problem at once,
and the note when max_steps overrides epochs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from loratune.adapters import LoraConfig
from loratune.cli import main
from loratune.data import DataConfig
from loratune.errors import ConfigError, ConfigWarning, closest
from loratune.training.config import (
    LORA_SHORT,
    SECTION_SYNONYMS,
    SECTIONS,
    SYNONYMS,
    ModelConfig,
    TrainConfig,
    load_run_config,
)


@pytest.fixture
def train_file(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    return f


def _load(train_file, *overrides, path=None):
    return load_run_config(path, [f"data.train={train_file}", *overrides])


def _problems(train_file, *overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        _load(train_file, *overrides, path=path)
    return str(e.value)


# --- 1. alias pairs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("short, full, a, b", [("alpha", "lora_alpha", 8, 16), ("dropout", "lora_dropout", 0.1, 0.2)])
def test_an_alias_pair_with_different_values_is_an_error_naming_both(train_file, short, full, a, b):
    for order in ([f"lora.{full}={a}", f"lora.{short}={b}"], [f"lora.{short}={b}", f"lora.{full}={a}"]):
        err = _problems(train_file, *order)
        assert f"lora.{short}={b}" in err and f"lora.{full}={a}" in err and "only one" in err


def test_an_alias_pair_with_the_same_value_resolves_to_one_key(train_file):
    cfg = _load(train_file, "lora.lora_alpha=16", "lora.alpha=16", "lora.dropout=0.1", "lora.lora_dropout=0.1")
    assert cfg.lora == {"lora_alpha": 16, "lora_dropout": 0.1}
    assert cfg.lora_config().lora_alpha == 16 and cfg.lora_config().lora_dropout == 0.1


def test_both_names_in_the_file_must_agree(train_file, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora:\n  alpha: 32\n  lora_alpha: 64\n")
    assert "lora.alpha=32 and lora.lora_alpha=64" in _problems(train_file, path=f)


def test_an_override_replaces_the_files_value_under_the_other_name(train_file, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lora:\n  alpha: 32\n  lora_dropout: 0.05\n")
    cfg = _load(train_file, "lora.lora_alpha=64", "lora.dropout=0.1", path=f)
    assert cfg.lora == {"lora_alpha": 64, "dropout": 0.1}
    assert cfg.lora_config().lora_alpha == 64 and cfg.lora_config().lora_dropout == 0.1


def test_overrides_replace_a_presets_value_under_the_other_name(train_file):
    preset = ["lora.alpha=32", "lora.dropout=0.05"]
    cfg = load_run_config(None, [f"data.train={train_file}", "lora.lora_alpha=64"], defaults=preset)
    assert cfg.lora == {"dropout": 0.05, "lora_alpha": 64}


def test_single_names_are_kept_as_written(train_file):
    assert _load(train_file, "lora.alpha=32").lora == {"alpha": 32}  # 32, not 32.0: it is written to files
    assert _load(train_file, "lora.lora_alpha=32").lora == {"lora_alpha": 32}


# --- 2. did you mean ------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, meant", [
    ("train.learning_rate", "lr"), ("train.num_train_epochs", "epochs"), ("train.num_epochs", "epochs"),
    ("train.per_device_train_batch_size", "batch_size"), ("train.micro_batch_size", "batch_size"),
    ("train.gradient_accumulation_steps", "grad_accum"), ("train.lr_scheduler_type", "scheduler"),
    ("train.lr_scheduler", "scheduler"), ("lora.rank", "r"), ("lora.lora_r", "r"),
    ("lora.lora_target_modules", "target_modules"), ("data.cutoff_len", "max_seq_len"),
    ("data.sequence_len", "max_seq_len"), ("data.max_length", "max_seq_len"), ("train.Learning-Rate", "lr"),
])
def test_names_from_other_tools_suggest_the_key_they_mean(train_file, key, meant):
    assert f"unknown key '{key}' (did you mean '{meant}'?)" in _problems(train_file, f"{key}=1")


def test_a_section_key_given_at_the_top_level_names_its_section(train_file):
    assert "did you mean 'train.lr'?" in _problems(train_file, "learning_rate=1e-4")
    assert "did you mean 'lora.r'?" in _problems(train_file, "lora_r=8")
    assert "unknown config section 'training' (did you mean 'train'?)" in _problems(train_file, "training.lr=1")


def test_synonyms_map_only_to_keys_that_exist():
    keys = {"train": {f.name for f in dataclasses.fields(TrainConfig)},
            "data": {f.name for f in dataclasses.fields(DataConfig)},
            "lora": {f.name for f in dataclasses.fields(LoraConfig)} | set(LORA_SHORT),
            "model": {f.name for f in dataclasses.fields(ModelConfig)}}
    for section, table in SYNONYMS.items():
        for name, target in table.items():
            assert target in keys[section], f"{section}.{name} -> {target}"
            assert name not in keys[section] and name == name.lower(), f"{section}.{name} is a valid key"
    assert set(SECTION_SYNONYMS.values()) <= set(SECTIONS)


def test_closest_consults_synonyms_before_the_fuzzy_match():
    assert closest("learning_rate", ["lr", "warmup_ratio"]) == " (did you mean 'warmup_ratio'?)"
    assert closest("learning_rate", ["lr", "warmup_ratio"], {"learning_rate": "lr"}) == " (did you mean 'lr'?)"
    assert closest("x", ["a"], {"x": "missing"}) == " (valid: a)"  # a synonym for a key not there is skipped


# --- 3. every problem at once ----------------------------------------------------------------------------
def test_all_problems_are_reported_together(train_file):
    err = _problems(train_file, "lora.r=0", "lora.dropout=1.5", "train.batch_size=abc")
    lines = err.splitlines()
    assert lines[0] == "3 problems in the config:"
    assert any(line.startswith("  - lora.r must be a positive integer") for line in lines)
    assert any(line.startswith("  - lora.dropout must be in [0, 1)") for line in lines)
    assert "  - 'train.batch_size' must be int (a whole number), got 'abc'; e.g. train.batch_size=8" in lines


def test_problems_from_every_section_and_kind_are_collected(train_file, tmp_path):
    err = _problems(train_file, "lora.rnak=8", "train.lr=-1", "train.epochs=many", "data.format=chatml",
                    f"data.eval={tmp_path / 'none.jsonl'}", "model=3", "nosuch.x=1", "lora.alpha=big")
    assert err.startswith("8 problems in the config:\n")
    for part in ("unknown key 'lora.rnak'", "train.lr must be a finite number > 0",
                 "train.epochs must be a number > 0 or auto",
                 "e.g. train.epochs=1", "unknown data format 'chatml'", "none.jsonl does not exist",
                 "'model' must be a model name or path", "unknown config section 'nosuch'",
                 "'lora.alpha' must be float"):
        assert part in err, part


def test_a_missing_train_file_is_a_config_error_not_a_type_error():
    with pytest.raises(ConfigError, match="data.train is required"):
        load_run_config(None, [])


def test_an_empty_yaml_section_still_takes_overrides(train_file, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\nlora:\n")
    cfg = _load(train_file, "train.lr=1e-3", "lora.r=4", path=f)
    assert cfg.train.lr == 1e-3 and cfg.lora == {"r": 4}


def test_the_cli_prints_all_problems_without_a_traceback(capsys, train_file, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("{}\n")
    assert main(["train", str(f), f"data.train={train_file}", "lora.r=0", "lora.dropout=1.5",
                 "train.batch_size=abc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("loratune train: error: 3 problems")
    assert "lora.r" in err and "lora.dropout" in err and "train.batch_size" in err


# --- 4. max_steps and epochs -----------------------------------------------------------------------------
def test_max_steps_and_epochs_both_set_warn_once(train_file):
    with pytest.warns(ConfigWarning, match="max_steps wins") as record:
        cfg = _load(train_file, "train.epochs=2", "train.max_steps=10")
    assert len([w for w in record if issubclass(w.category, ConfigWarning)]) == 1
    assert cfg.train.max_steps == 10


def test_the_file_and_an_override_together_warn_too(train_file, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  max_steps: 40\n")
    with pytest.warns(ConfigWarning, match="train.max_steps=null"):
        _load(train_file, "train.epochs=3", path=f)


@pytest.mark.parametrize("overrides", [[], ["train.epochs=2"], ["train.max_steps=10"],
                                       ["train.max_steps=10", "train.epochs=null"]])
def test_one_of_them_alone_does_not_warn(train_file, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        _load(train_file, *overrides)
