"""Issue 20, training: ranges, run directories, resume after damage, disk full, checkpoints kept."""

from __future__ import annotations

import errno
import json
import math

import pytest

from loratune.errors import ConfigError, ConfigWarning, DataError
from loratune.training import checkpoints
from loratune.training.config import load_run_config
from loratune.training.loop import TrainingError, latest_checkpoint, train


def _cfg(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return load_run_config(None, [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}",
                                  f"output_dir={out}", "train.max_steps=4", "train.batch_size=4", "lora.r=4",
                                  "train.lr=1e-2", "data.max_seq_len=64", *extra])


@pytest.mark.parametrize("override, words", [
    ("train.max_grad_norm=-1", "train.max_grad_norm must be a finite number ≥ 0"),
    ("train.weight_decay=-5", "train.weight_decay must be a finite number ≥ 0"),
    ("train.lr=.nan", "train.lr must be a finite number > 0"),
    ("train.lr=0", "train.lr must be a finite number > 0"),
    ("train.epochs=.inf", "train.epochs must be a finite number > 0"),
    ("train.save_every=-1", "train.save_every must be ≥ 0"),
    ("train.eval_every=-2", "train.eval_every must be ≥ 0"),
    ("train.warmup_ratio=1.0", "train.warmup_ratio must be in [0, 1)"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio must be in [0, 1)"),
    ("train.loraplus_lr_ratio=-16", "train.loraplus_lr_ratio must be a finite number > 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be ≥ 1"),
    ("train.early_stopping_threshold=.nan", "train.early_stopping_threshold must be a finite number ≥ 0"),
    ("lora.alpha=.nan", "lora.alpha must be a positive number"),
])
def test_out_of_range_values_are_refused(data_files, override, words):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [f"data.train={data_files[0]}", override])
    assert words in str(e.value)


def test_a_config_file_that_is_binary_or_a_directory_is_one_error(tmp_path):
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not a text file"):
        load_run_config(binary)
    with pytest.raises(ConfigError, match="is a directory; pass the YAML file itself"):
        load_run_config(tmp_path)


def test_a_chat_template_path_is_read_or_named(tmp_path, data_files):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = load_run_config(None, [f"data.train={data_files[0]}", f"data.chat_template={template}"])
    assert cfg.data.chat_template == template.read_text()
    with pytest.raises((ConfigError, DataError), match="neither a Jinja template .* nor an existing file"):
        load_run_config(None, [f"data.train={data_files[0]}", f"data.chat_template={tmp_path / 'none.jinja'}"])


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.save_every=1")
    train(cfg, progress=False, stop_after=2)
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # killed while appending
    with pytest.warns(ConfigWarning, match="last line was cut off"):
        res = train(cfg, progress=False)
    assert [h["step"] for h in res.history] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_run_from_before_a_new_null_key_resumes_but_a_real_change_is_refused(tiny_dir, data_files, tmp_path,
                                                                               capsys):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.save_every=1")
    train(cfg, progress=False, stop_after=2)

    def older(text: str) -> str:  # the config as a loratune without train.early_stopping_threshold wrote it
        assert "  early_stopping_threshold: null\n" in text
        return text.replace("  early_stopping_threshold: null\n", "")

    saved = tmp_path / "run_config.yaml"
    saved.write_text(older(saved.read_text()))
    for state in tmp_path.glob("checkpoints/step-*/trainer_state.json"):
        s = json.loads(state.read_text())
        state.write_text(json.dumps({**s, "config": older(s["config"])}))
    capsys.readouterr()
    res = train(cfg, progress=False)  # the same run: resumed from step 2, not refused, not started over
    assert [h["step"] for h in res.history] == [1, 2, 3, 4] and res.steps == 4
    assert "(step 2 of 4)" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="different config"):
        train(_cfg(tiny_dir, data_files, tmp_path, "train.save_every=1", "train.early_stopping_threshold=0.5"),
              progress=False)


def test_a_lora_default_given_is_the_same_run_and_a_change_reads_old_to_new(tiny_dir, data_files, tmp_path):
    train(_cfg(tiny_dir, data_files, tmp_path), progress=False)  # lora alpha and dropout not given: 32, 0.05
    train(_cfg(tiny_dir, data_files, tmp_path, "lora.alpha=32", "lora.lora_dropout=0.05"), progress=False)  # same
    with pytest.raises(TrainingError, match=r"lora.r: 4 -> 8"):
        train(_cfg(tiny_dir, data_files, tmp_path, "lora.r=8"), progress=False)


def test_a_run_config_edited_into_invalid_yaml_is_named_and_overwrite_replaces_it(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path)
    train(cfg, progress=False)
    saved = tmp_path / "run_config.yaml"
    saved.write_text(saved.read_text() + "train: [unclosed\n")
    with pytest.raises(TrainingError, match=r"run_config.yaml is not valid YAML .*pass --overwrite"):
        train(cfg, progress=False)
    train(cfg, overwrite=True, progress=False)
    assert "unclosed" not in saved.read_text()


def test_a_damaged_middle_metrics_line_is_named(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.save_every=1")
    train(cfg, progress=False, stop_after=2)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("garbage\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(TrainingError, match="line 1 is damaged"):
        train(cfg, progress=False)


def test_stale_temps_are_removed_and_old_checkpoints_pruned(tiny_dir, data_files, tmp_path):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.save_every=1", "train.keep_checkpoints=2")
    train(cfg, progress=False, stop_after=1)
    stale = tmp_path / "checkpoints" / ".step-0000002.tmp-abc"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"x")
    with pytest.warns(ConfigWarning, match="interrupted write"):
        train(cfg, progress=False)
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


def test_a_run_that_never_trained_can_be_taken_over(tiny_dir, data_files, tmp_path, monkeypatch):
    bad = _cfg(tiny_dir, data_files, tmp_path, "train.lr=1e-3")
    monkeypatch.setattr("loratune.training.loop.response_loss_sum", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # dies in its first step, after claiming the directory
        train(bad, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "run_config.yaml").is_file() and latest_checkpoint(tmp_path) is None
    with pytest.warns(ConfigWarning, match="never finished a step"):
        train(_cfg(tiny_dir, data_files, tmp_path), progress=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_directory_that_holds_outputs_but_no_run_is_refused_untouched(tiny_dir, data_files, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "mine.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not a loratune run's directory"):
        train(_cfg(tiny_dir, data_files, tmp_path), progress=False, overwrite=True)
    assert (tmp_path / "adapter" / "mine.txt").read_text() == "keep me"


def test_output_dir_that_is_a_file_or_unwritable_is_one_error(tiny_dir, data_files, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("mine")
    with pytest.raises(TrainingError, match="is a file"):
        train(_cfg(tiny_dir, data_files, afile), progress=False)
    with pytest.raises(TrainingError, match="cannot be written"):
        train(_cfg(tiny_dir, data_files, "/proc/loratune-run"), progress=False)
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one(tiny_dir, data_files, tmp_path, monkeypatch):
    cfg = _cfg(tiny_dir, data_files, tmp_path, "train.save_every=1")
    train(cfg, progress=False, stop_after=2)
    real = checkpoints.save_tensors

    def full(tensors, path, metadata=None):
        if "trainer_state" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(checkpoints, "save_tensors", full)
    with pytest.raises(TrainingError, match="No space left on device.*resumes from step-0000002"):
        train(cfg, progress=False)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert latest_checkpoint(tmp_path).name == "step-0000002"


def test_overwrite_removes_the_old_outputs_first(tiny_dir, data_files, tmp_path):
    train(_cfg(tiny_dir, data_files, tmp_path), progress=False)
    assert (tmp_path / "adapter").is_dir()
    other = _cfg(tiny_dir, data_files, tmp_path, "lora.r=2")
    train(other, progress=False, overwrite=True, stop_after=1)  # killed before the end: no adapter at all
    assert not (tmp_path / "adapter").exists()  # never the old weights beside the new config
    res = train(other, progress=False)
    assert res.model.peft_config["default"].r == 2 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2


def test_max_seq_len_beyond_the_models_positions_is_limited_with_a_note(tiny_dir, data_files, tmp_path):
    with pytest.warns(ConfigWarning, match="beyond the model's max_position_embeddings=256"):
        res = train(_cfg(tiny_dir, data_files, tmp_path, "data.max_seq_len=4096", "data.packing=true"),
                    progress=False)
    assert max(len(e.input_ids) for e in res.data.train) <= 256 and math.isfinite(res.history[-1]["loss"])
