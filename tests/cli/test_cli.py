"""The command line, in process: every command once, and every bad input as one line and exit code 2."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.adapters import LoraModel
from loratune.cli import main

from conftest import rel_err


def _args(tiny_dir, data_files, out, *extra):
    train_f, eval_f = data_files
    return [f"model={tiny_dir}", f"data.train={train_f}", f"data.eval={eval_f}", f"output_dir={out}",
            "train.max_steps=3", "train.batch_size=4", "lora.r=4", "train.lr=1e-2", "data.max_seq_len=64", *extra]


@pytest.fixture
def cfg_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  seed: 0\n")
    return f


@pytest.fixture(scope="module")
def trained(tiny_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    f = out / "run.yaml"
    f.write_text("{}\n")
    assert main(["train", str(f), *_args(tiny_dir, data_files, out), "--no-progress"]) == 0
    return out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_dry_run_shows_config_data_example_and_params(capsys, tiny_dir, data_files, tmp_path, cfg_file):
    assert main(["train", str(cfg_file), *_args(tiny_dir, data_files, tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and "r: 4" in out
    assert "train: examples ready: 32" in out
    assert "[[" in out and "<|im_end|>]]" in out
    assert "trainable params:" in out and "estimated training time on this machine" in out
    assert not (tmp_path / "o" / "adapter").exists()


def test_train_writes_adapter_and_summary(trained):
    assert (trained / "adapter" / "adapter_model.safetensors").is_file()
    assert (trained / "loss_curve.png").stat().st_size > 1000


def test_eval_table_and_json(capsys, trained, data_files):
    assert main(["eval", "--adapter", str(trained / "adapter"), "--data", str(data_files[1]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"base", "adapter"}
    assert rows["adapter"]["n"] == 8 and 0 <= rows["adapter"]["exact_match"] <= 1
    assert rows["adapter"]["loss"] != rows["base"]["loss"]
    assert main(["eval", "--adapter", str(trained / "adapter"), "--data", str(data_files[1])]) == 0
    table = capsys.readouterr().out
    assert "exact_match" in table and "base" in table and "adapter" in table


def test_merge_gives_an_hf_model_with_the_same_outputs(trained, tmp_path, tiny_dir):
    assert main(["merge", "--adapter", str(trained / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    lm = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), trained / "adapter")
    x = torch.randint(0, 1000, (2, 12))
    assert rel_err(merged(input_ids=x).logits, lm(input_ids=x).logits) <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()


def test_generate_and_chat(capsys, trained, monkeypatch):
    assert main(["generate", "--adapter", str(trained / "adapter"), "--max-new-tokens", "4", "What is 1 plus 2?"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # a random tiny model may answer with an empty string
    answers = iter(["hello", ""])
    monkeypatch.setattr("builtins.input", lambda _: next(answers))
    assert main(["chat", "--adapter", str(trained / "adapter"), "--max-new-tokens", "3"]) == 0


def test_bad_inputs_are_one_line_errors(capsys, tiny_dir, data_files, tmp_path, cfg_file):
    a = _args(tiny_dir, data_files, tmp_path / "o")
    assert "does not exist" in _error(capsys, ["train", str(tmp_path / "none.yaml")])
    assert "did you mean 'lr'" in _error(capsys, ["train", str(cfg_file), *a, "train.lrate=1"])
    assert "unknown config section 'trian'" in _error(capsys, ["train", str(cfg_file), *a, "trian.lr=1"])
    assert "'train.batch_size' must be int" in _error(capsys, ["train", str(cfg_file), *a, "train.batch_size=big"])
    assert "not found" in _error(capsys, ["train", str(cfg_file), *a, f"model={tmp_path / 'nomodel'}", "--dry-run"])
    missing = _error(capsys, ["train", str(cfg_file), *a, f"data.train={tmp_path / 'x.jsonl'}", "--dry-run"])
    assert "x.jsonl" in missing
    assert "unknown data format" in _error(capsys, ["train", str(cfg_file), *a, "data.format=chatml"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n{"prompt": "d", "completion": "e"}\n')
    assert "row 2" in _error(capsys, ["train", str(cfg_file), *a, f"data.train={bad}", "--dry-run"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": " ", "completion": ""}\n')
    assert "empty" in _error(capsys, ["train", str(cfg_file), *a, f"data.train={empty}", "--dry-run"]).lower()
    assert "r must be a positive integer" in _error(capsys, ["train", str(cfg_file), *a, "lora.r=0"])
    assert "lacks adapter_config.json" in _error(capsys, ["eval", "--adapter", str(tmp_path), "--data", str(bad)])


def test_output_dir_with_another_run_is_refused(capsys, tiny_dir, data_files, trained, cfg_file):
    err = _error(capsys, ["train", str(cfg_file), *_args(tiny_dir, data_files, trained, "lora.r=8")])
    assert "different config" in err and "--overwrite" in err


def test_help_everywhere(capsys):
    for cmd in ([], ["train"], ["eval"], ["generate"], ["chat"], ["merge"], ["quickstart"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: loratune" in capsys.readouterr().out


def test_overrides_may_follow_flags(capsys, tiny_dir, data_files, tmp_path, cfg_file):
    a = _args(tiny_dir, data_files, tmp_path / "o")
    assert main(["train", str(cfg_file), "--dry-run", *a, "lora.r=6"]) == 0
    assert "r: 6" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg_file), "--dry-run", "--bogus", *a])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_failed_run_does_not_block_the_corrected_one(capsys, tiny_dir, data_files, tmp_path, cfg_file):
    out = tmp_path / "o"
    err = _error(capsys, ["train", str(cfg_file), *_args(tiny_dir, data_files, out), "lora.target_modules=[nope]",
                          "--no-progress"])
    assert "nope" in err
    assert not (out / "run_config.yaml").exists()
    assert main(["train", str(cfg_file), *_args(tiny_dir, data_files, out), "--no-progress"]) == 0


def test_eval_uses_the_prompt_the_adapter_was_trained_with(capsys, tiny_dir, data_files, tmp_path, cfg_file):
    out = tmp_path / "o"
    args = [*_args(tiny_dir, data_files, out), "data.system_prompt=Answer with the date only."]
    assert main(["train", str(cfg_file), *args]) == 0
    trained_eval = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(data_files[1]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert abs(rows["adapter"]["loss"] - trained_eval) <= 1e-6 * trained_eval
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(data_files[1]), "--json",
                 "--system-prompt", "Something else entirely."]) == 0
    # a tiny random model barely reads the prompt, but a different prompt is still a different loss
    assert abs(json.loads(capsys.readouterr().out)["adapter"]["loss"] - trained_eval) > 1e-5 * trained_eval


def test_a_model_without_a_chat_template_gets_plain_text_prompts(trained):
    from transformers import AutoTokenizer

    from loratune.cli.infer import prompt_ids

    tok = AutoTokenizer.from_pretrained(trained / "adapter")
    chat = prompt_ids(tok, [{"role": "user", "content": "hi there"}], "be brief")
    assert tok.decode(chat).count("<|im_start|>") == 3  # system, user, and the assistant's turn
    tok.chat_template = None
    assert prompt_ids(tok, [{"role": "user", "content": "hi there"}], None) == tok("hi there")["input_ids"]


@pytest.mark.bundled
def test_a_classifier_is_refused_for_generation(capsys):
    err = _error(capsys, ["generate", "--model", "all-minilm-l6-v2", "hello"])
    assert "not a causal language model" in err and "smollm2-135m-instruct" in err


def test_written_files_follow_the_umask(trained, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["merge", "--adapter", str(trained / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "merged" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((trained / "adapter" / "adapter_model.safetensors").stat().st_mode) & 0o044
