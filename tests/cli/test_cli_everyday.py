"""Everyday use (issue 22): eval flags and progress, generation options, chat commands, ``info``, ``--version``,
hub ids read offline from a planted Hugging Face cache, and adapters that PEFT's AutoPeftModel loads offline."""

from __future__ import annotations

import io
import json
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune.adapters import LoraModel
from loratune.cli import main

from conftest import tiny_llama


def _train_args(model, data_files, out):
    train_f, eval_f = data_files
    return [f"model={model}", f"data.train={train_f}", f"data.eval={eval_f}", f"output_dir={out}",
            "train.max_steps=2", "train.batch_size=4", "lora.r=4", "train.lr=1e-2", "data.max_seq_len=64",
            "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tiny_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    (out / "run.yaml").write_text("{}\n")
    assert main(["train", str(out / "run.yaml"), *_train_args(tiny_dir, data_files, out)]) == 0
    return out


def _strict_json(text: str):
    def no_constant(name):
        raise AssertionError(f"{name} in JSON output")

    return json.loads(text, parse_constant=no_constant)


def _eval(capsys, run_dir, data_files, *flags):
    assert main(["eval", "--adapter", str(run_dir / "adapter"), "--data", str(data_files[1]),
                 "--max-new-tokens", "4", *flags]) == 0
    return capsys.readouterr()


def test_eval_no_base_never_runs_the_base_and_shows_progress(capsys, run_dir, data_files, monkeypatch):
    def refuse(self):
        raise AssertionError("the base model was run")

    monkeypatch.setattr(LoraModel, "disable_adapter", refuse)
    cap = _eval(capsys, run_dir, data_files, "--no-base", "--json")
    rows = _strict_json(cap.out)
    assert list(rows) == ["adapter"] and rows["adapter"]["n"] == 8
    assert "adapter exact match" in cap.err and "row" in cap.err and "<" in cap.err  # tqdm: elapsed<remaining


def test_eval_base_only_and_no_progress(capsys, run_dir, data_files, monkeypatch):
    calls = []
    monkeypatch.setattr(LoraModel, "merge_adapter", lambda self, *a, **k: calls.append(1))
    cap = _eval(capsys, run_dir, data_files, "--base-only", "--json", "--no-progress")
    assert list(_strict_json(cap.out)) == ["base"] and not calls  # the adapter was never folded in
    assert "exact match" not in cap.err
    default = _strict_json(_eval(capsys, run_dir, data_files, "--json", "--no-progress").out)
    assert list(default) == ["base", "adapter"]


def test_eval_show_prints_misses_first(capsys, run_dir, data_files):
    out = _eval(capsys, run_dir, data_files, "--no-base", "--show", "3", "--no-progress").out
    assert "adapter: 3 example(s), misses first" in out
    marks = [line.split()[0] for line in out.splitlines() if line.startswith("  MISS") or line.startswith("  hit")]
    assert len(marks) == 3 and marks == sorted(marks)  # ("MISS" sorts before "hit")
    assert out.count("expected '") == 3
    shown = _strict_json(_eval(capsys, run_dir, data_files, "--no-base", "--show", "2", "--json").out)
    assert [sorted(e) for e in shown["adapter"]["examples"]] == [["match", "prediction", "prompt", "reference"]] * 2


def test_eval_flag_errors_are_one_line(capsys, run_dir, data_files):
    assert main(["eval", "--data", str(data_files[1]), "--no-base"]) == 2
    assert "--no-base leaves nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--adapter", "x", "--data", "y", "--no-base", "--base-only"])
    assert "not allowed with" in capsys.readouterr().err


def _generate(capsys, run_dir, *flags) -> str:
    assert main(["generate", "--adapter", str(run_dir / "adapter"), "What is 3 plus 4?", "--max-new-tokens", "12",
                 *flags]) == 0
    return capsys.readouterr().out.strip()


def test_sampling_flags_are_deterministic_under_seed(capsys, run_dir):
    greedy = _generate(capsys, run_dir)
    assert greedy == _generate(capsys, run_dir, "--no-stream")  # streamed token by token = printed at the end
    hot = ["--temperature", "1.5", "--top-k", "1000", "--top-p", "0.99"]
    a, b = _generate(capsys, run_dir, *hot, "--seed", "1"), _generate(capsys, run_dir, *hot, "--seed", "1")
    c = _generate(capsys, run_dir, *hot, "--seed", "2")
    assert a == b and a != c and a != greedy
    assert _generate(capsys, run_dir, "--top-k", "1", "--seed", "3") == greedy  # top-1 sampling is greedy
    assert main(["generate", "--adapter", str(run_dir / "adapter"), "hi", "--temperature", "0", "--top-p", "0.5"]) == 2
    assert "--temperature 0 is greedy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--top-p", "1.5"])
    assert "must be a number > 0 and ≤ 1" in capsys.readouterr().err


def _chat(capsys, monkeypatch, run_dir, lines: list[str], *flags) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", "--adapter", str(run_dir / "adapter"), "--max-new-tokens", "4", "--no-stream",
                 *flags]) == 0
    return capsys.readouterr().out


def test_chat_commands_from_piped_stdin(capsys, monkeypatch, run_dir):
    seen = []
    import loratune.cli.infer as infer

    real = infer.prompt_ids
    monkeypatch.setattr(infer, "prompt_ids", lambda tok, msgs, sp: seen.append((list(msgs), sp)) or real(tok, msgs, sp))
    out = _chat(capsys, monkeypatch, run_dir, ["hello", "again", "/reset", "/system Answer in French.", "bonjour",
                                               "/nope", "/exit", "never read"])
    assert "(history cleared)" in out and "(system prompt set; history cleared)" in out
    assert "unknown command /nope" in out
    assert [len(m) for m, _ in seen] == [1, 3, 1]  # history grows, then /reset and /system empty it
    assert seen[2][1] == "Answer in French." and seen[2][0][0]["content"] == "bonjour"
    assert not any(m[-1]["content"] == "never read" for m, _ in seen)  # /exit stops reading


def test_chat_drops_the_oldest_turns_to_fit_the_context(capsys, monkeypatch, run_dir):
    long = " ".join(["number"] * 60)  # ~60 tokens; the tiny model's context is 256
    out = _chat(capsys, monkeypatch, run_dir, [long, long, long, long, " ".join(["number"] * 400)])
    assert "oldest exchange(s) to stay within the model's context of 252 tokens" in out
    assert "that message alone is longer than the model's context of 256 tokens" in out


def test_info_on_a_run_adapter(capsys, run_dir, tiny_dir):
    assert main(["info", str(run_dir / "adapter"), "--model", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    n = sum(t.numel() for t in load_file(run_dir / "adapter" / "adapter_model.safetensors").values())
    assert f"{n:,} in " in out and "r=4 alpha=" in out and str(tiny_dir) in out
    assert "variant" in out and "LoRA, init True" in out and "2 steps, train loss" in out
    assert re.search(rf"loads on {re.escape(str(tiny_dir))}\s+yes$", out, re.M)
    assert main(["info", str(run_dir / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["run"]["config"]["train"]["max_steps"] == 2 and info["run"]["metrics"]["steps"] == 2
    assert info["weights"]["parameters"] == n and info["weights"]["file_bytes"] > 0


def test_info_on_a_peft_adapter_and_a_base_it_does_not_fit(capsys, tmp_path, tiny_dir):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    use_dora=True, init_lora_weights="gaussian"))
    model.save_pretrained(tmp_path / "peft")
    assert main(["info", str(tmp_path / "peft"), "--model", str(tiny_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "DoRA" and info["init_lora_weights"] == "gaussian" and info["r"] == 2
    assert sorted(info["target_modules"]) == ["q_proj", "v_proj"] and info["run"] is None
    assert info["weights"]["parameters"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert info["loads_on"]["ok"] is False and info["loads_on"]["error"]  # hidden 64 vs the tiny dir's 32
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("loratune 0.")


@pytest.fixture
def hub_cache(tmp_path, tiny_dir, monkeypatch):
    """``tiny_dir`` planted in a Hugging Face cache as ``tiny-org/tiny-llama``; the hub offline and sockets barred."""
    from huggingface_hub import constants

    snap = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(tmp_path / "hub"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def no_network(*a, **k):
        raise AssertionError("a test opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path / "hub"


def test_a_hub_id_loads_offline_from_the_cache(hub_cache, tiny_dir, capsys):
    from loratune.models import load_base_model

    model, tok = load_base_model("tiny-org/tiny-llama")
    ref, _ = load_base_model(tiny_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert tok.chat_template
    assert main(["generate", "--model", "tiny-org/absent", "hi"]) == 2
    assert "is not in the Hugging Face cache" in capsys.readouterr().err


def test_peft_automodel_loads_an_adapter_trained_on_a_hub_id(hub_cache, data_files, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM

    (tmp_path / "run.yaml").write_text("{}\n")
    assert main(["train", str(tmp_path / "run.yaml"), *_train_args("tiny-org/tiny-llama", data_files,
                                                                   tmp_path / "out")]) == 0
    adapter = tmp_path / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-org/tiny-llama"
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    ours = LoraModel.from_pretrained(tiny_llama_from(hub_cache), adapter).eval()
    x = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=x).logits, ours(input_ids=x).logits, atol=1e-5)


def tiny_llama_from(hub_cache):
    from loratune.models import load_base_model

    return load_base_model("tiny-org/tiny-llama")[0]


@pytest.mark.bundled
@pytest.mark.slow
def test_peft_automodel_loads_an_adapter_on_the_bundled_models_converted_copy(tmp_path, monkeypatch):
    """What issue 22 asks the run to record for the bundled model: the converted copy's absolute path."""
    from huggingface_hub import constants
    from peft import AutoPeftModelForCausalLM

    from loratune import LoraConfig, get_lora_model, load_base_model
    from loratune.models import resolve_model_path

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    base, _ = load_base_model("smollm2-135m-instruct")
    copy = str(resolve_model_path("smollm2-135m-instruct"))
    lm = get_lora_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian",
                                         task_type="CAUSAL_LM", base_model_name_or_path=copy))
    lm.save_pretrained(tmp_path / "a")
    x = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        want = lm(input_ids=x).logits
        got = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a").eval()(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_quickstart_summary_labels_a_hit_and_a_miss(capsys):
    from loratune.cli.quickstart import print_exact_match

    def em(*matches):
        rows = [{"prompt": "p", "reference": f"ref{i}", "prediction": f"ref{i}" if m else f"bad{i}", "match": m}
                for i, m in enumerate(matches)]
        return {"exact_match": sum(matches) / len(matches), "examples": sorted(rows, key=lambda e: e["match"])}

    print_exact_match(em(False, False), em(True, False, True))
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:] == ["  base model     0.0%", "      hit   (none)", "      miss  'bad0', expected 'ref0'",
                         "  with LoRA     66.7%", "      hit   'ref0'", "      miss  'bad1', expected 'ref1'"]


def test_an_adapter_names_a_resolvable_base_and_falls_back_to_the_recorded_name(tmp_path, tiny_dir):
    """base_reference: a local path made absolute, a hub id kept; recorded_base: a recorded path that no longer
    exists falls back to the base's own name that `loratune train` kept in loratune_prompt.json."""
    from loratune.adapters.files import PROMPT_NAME, recorded_base
    from loratune.models import base_reference

    assert base_reference("tiny-org/not-here") == "tiny-org/not-here"
    assert base_reference(str(tiny_dir)) == str(Path(tiny_dir).resolve())
    from safetensors.torch import save_file

    d = tmp_path / "a"
    d.mkdir()
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 4)}, d / "adapter_model.safetensors")
    gone = str(tmp_path / "moved-away")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                       "target_modules": ["q_proj"], "base_model_name_or_path": gone}))
    assert recorded_base(d) == gone  # nothing recorded besides: the path is all there is
    (d / PROMPT_NAME).write_text(json.dumps({"system_prompt": None, "base_model": "smollm2-135m-instruct"}))
    assert recorded_base(d) == "smollm2-135m-instruct"
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                       "target_modules": ["q_proj"],
                                                       "base_model_name_or_path": str(tiny_dir)}))
    assert recorded_base(d) == str(tiny_dir)  # an existing path wins


@pytest.mark.bundled
def test_the_bundled_name_is_recorded_as_its_converted_copy():
    from loratune.models import base_reference, resolve_model_path

    ref = base_reference("smollm2-135m-instruct")
    assert Path(ref).is_absolute() and (Path(ref) / "config.json").is_file()
    assert ref == str(resolve_model_path("smollm2-135m-instruct").resolve())
