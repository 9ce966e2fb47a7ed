"""The classification loop (task: classification) on a tiny random BERT with MiniLM's tokenizer: metrics against
scikit-learn, the weighted loss against torch's, grad_accum, resume, PEFT interop, refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from loratune.adapters import LoraModel
from loratune.data.intents import intent_rows, make_intent_task
from loratune.data.labels import LabelSet, read_labelled
from loratune.errors import ConfigError, ConfigWarning
from loratune.training.checkpoints import TrainingError
from loratune.training.class_metrics import confusion_table, scores
from loratune.training.classify import check_encoder, load_classifier, predict_logits, train_classifier, weighted_loss
from loratune.training.config import load_run_config

from conftest import rel_err, save_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden=64, heads=4, dropout=0.0)


@pytest.fixture(scope="module")
def intents(tmp_path_factory) -> tuple[Path, Path]:
    return make_intent_task(tmp_path_factory.mktemp("intents"), n_train=48, n_eval=20)


def _cfg(bert_dir, data, out, *extra):
    return load_run_config(None, ["task=classification", f"model={bert_dir}", f"data.train={data[0]}",
                                  f"data.eval={data[1]}", f"output_dir={out}", "train.max_steps=4",
                                  "train.batch_size=8", "lora.r=4", "lora.dropout=0", "train.lr=1e-2",
                                  "data.max_seq_len=32", *extra])


def test_scores_equal_scikit_learn_on_random_predictions():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for k, n in ((2, 10), (5, 40), (7, 13)):  # (7, 13): some classes occur in neither, some only predicted
        true, pred = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
        s = scores(true, pred, k)
        assert s["accuracy"] == pytest.approx(metrics.accuracy_score(true, pred), abs=1e-12)
        assert s["macro_f1"] == pytest.approx(metrics.f1_score(true, pred, average="macro", zero_division=0),
                                              abs=1e-12)
        assert s["confusion"] == metrics.confusion_matrix(true, pred, labels=list(range(k))).tolist()
    table = confusion_table([[3, 1], [0, 4]], ["no", "yes"]).splitlines()
    assert table[1].split() == ["no", "3", "1"] and table[2].split() == ["yes", "0", "4"]


def test_weighted_loss_equals_torch_cross_entropy_in_float64():
    g = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(12, 4, generator=g), torch.randint(0, 4, (12,), generator=g)
    w = torch.rand(4, generator=g) + 0.1
    for weights in (None, w):
        total, denom = weighted_loss(logits, targets, weights)
        ref = F.cross_entropy(logits.double(), targets, weight=None if weights is None else weights.double())
        assert (total / denom).item() == pytest.approx(ref.item(), rel=1e-6)
        # partial sums over two micro-batches add up to the whole batch's
        a, b = weighted_loss(logits[:5], targets[:5], weights), weighted_loss(logits[5:], targets[5:], weights)
        assert ((a[0] + b[0]) / (a[1] + b[1])).item() == pytest.approx(ref.item(), rel=1e-6)


def test_training_learns_and_writes_a_peft_adapter_with_labels(bert_dir, intents, tmp_path):
    few = tmp_path / "few.jsonl"  # 15 rows in one batch: a tiny random BERT can fit them in a few dozen steps
    few.write_text("".join(json.dumps(r) + "\n" for r in intent_rows(15, seed=3)))
    res = train_classifier(_cfg(bert_dir, (few, intents[1]), tmp_path, "train.max_steps=40", "train.batch_size=15",
                                "train.lr=3e-3", "train.scheduler=constant", "train.warmup_ratio=0",
                                "train.class_weights=balanced"), progress=False)
    losses = [h["loss"] for h in res.history]
    assert losses[0] == pytest.approx(1.609, abs=0.05)  # ln 5: a fresh head knows nothing
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]
    assert "eval_accuracy" in res.history[-1] and "eval_loss" in res.history[-1]
    adapter = tmp_path / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "loratune_labels.json", "tokenizer.json",
                 "loratune_prompt.json"):
        assert (adapter / name).is_file(), name
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    assert set(cfg["target_modules"]) >= {"query", "key", "value", "dense"}  # all of the encoder's linears
    assert LabelSet.load(adapter).labels == ("alarm", "directions", "music", "shopping", "weather")
    assert "base_model.model.classifier.weight" in load_file(adapter / "adapter_model.safetensors")  # the head
    # the accuracy logged equals the saved adapter's, reloaded on a fresh base
    labels = LabelSet.load(adapter)
    model, tok = load_classifier(str(bert_dir), labels)
    lm = LoraModel.from_pretrained(model, adapter)
    rows = read_labelled(str(intents[1]), labels, "eval file")
    pred = predict_logits(lm, tok, rows, 7, 32).argmax(-1)
    acc = (pred == torch.tensor(labels.ids(rows, "eval"))).float().mean().item()
    assert acc == pytest.approx(res.history[-1]["eval_accuracy"], abs=1e-6)


def test_adapter_loads_in_peft_with_the_same_logits(bert_dir, intents, tmp_path):
    peft = pytest.importorskip("peft")
    train_classifier(_cfg(bert_dir, intents, tmp_path), progress=False)
    adapter = tmp_path / "adapter"
    labels = LabelSet.load(adapter)
    model, tok = load_classifier(str(bert_dir), labels)
    ours = LoraModel.from_pretrained(model, adapter).eval()
    rows = read_labelled(str(intents[1]), labels, "eval file")
    batch = tok([r.text for r in rows], padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=len(labels.labels))
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=len(labels.labels)).eval()
    with torch.no_grad():
        a = ours(**batch).logits
        b, c = theirs(**batch).logits, auto(**batch).logits
        assert rel_err(a, b) <= 1e-5 and rel_err(a, c) <= 1e-5
        with ours.disable_adapter():  # (the adapter matters: the base with its fresh head differs)
            fresh = ours(**batch).logits
    assert rel_err(fresh, a) > 1e-2


def test_grad_accum_gives_the_same_step(bert_dir, intents, tmp_path):
    one = train_classifier(_cfg(bert_dir, intents, tmp_path / "a", "train.max_steps=2", "train.class_weights=balanced"),
                           progress=False)
    two = train_classifier(_cfg(bert_dir, intents, tmp_path / "b", "train.max_steps=2", "train.batch_size=4",
                                "train.grad_accum=2", "train.class_weights=balanced"), progress=False)
    for h1, h2 in zip(one.history, two.history):
        assert h1["loss"] == pytest.approx(h2["loss"], rel=1e-5)
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_killed_and_resumed_run_ends_with_the_same_adapter(bert_dir, intents, tmp_path):
    extra = ("train.max_steps=6", "train.save_every=2", "lora.dropout=0.1")  # dropout: the RNG state is resumed
    train_classifier(_cfg(bert_dir, intents, tmp_path / "full", *extra), progress=False)
    cfg = _cfg(bert_dir, intents, tmp_path / "part", *extra)
    train_classifier(cfg, progress=False, stop_after=3)  # "killed" after step 3: the last checkpoint is step 2
    assert not (tmp_path / "part" / "adapter").exists()
    res = train_classifier(cfg, progress=False)
    assert [h["step"] for h in res.history] == list(range(1, 7))
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (tmp_path / "full", tmp_path / "part"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)


def test_refusals(bert_dir, intents, tiny_dir, tmp_path):
    check_encoder(str(bert_dir))
    for name in (str(tiny_dir), "smollm2-135m-instruct"):
        with pytest.raises(ConfigError, match="causal language model.*not an encoder.*all-minilm-l6-v2"):
            check_encoder(name)
    with pytest.raises(ConfigError, match="class_weights has 2 number.*5 labels"):
        train_classifier(_cfg(bert_dir, intents, tmp_path, "train.class_weights=[1, 2]"), progress=False)
    with pytest.raises(ConfigError, match="model.quantize is not supported"):
        train_classifier(_cfg(bert_dir, intents, tmp_path, "model.quantize=nf4"), progress=False)
    with pytest.raises(ConfigError, match="early_stopping_patience and train.load_best are not supported"):
        train_classifier(_cfg(bert_dir, intents, tmp_path, "train.load_best=true"), progress=False)
    assert not (tmp_path / "run_config.yaml").exists()  # refused before the output dir is taken


def test_the_example_config_is_a_classification_run(tmp_path, monkeypatch):
    example = Path(__file__).resolve().parents[2] / "examples" / "classification.yaml"
    monkeypatch.chdir(tmp_path)
    make_intent_task(tmp_path / "data" / "intents", n_train=10, n_eval=5)
    cfg = load_run_config(example)
    assert cfg.task == "classification" and cfg.model.name == "all-minilm-l6-v2"
    assert cfg.lora_config().task_type == "SEQ_CLS"
    assert (cfg.data.text_column, cfg.data.label_column) == ("text", "label")


def test_rerunning_a_finished_run_trains_nothing_and_writes_the_same_adapter(bert_dir, intents, tmp_path):
    cfg = _cfg(bert_dir, intents, tmp_path, "train.max_steps=2")
    train_classifier(cfg, progress=False)
    first = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    res = train_classifier(cfg, progress=False)
    assert [h["step"] for h in res.history] == [1, 2]
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_longer_config_extends_the_run_and_a_shorter_one_is_refused(bert_dir, intents, tmp_path):
    train_classifier(_cfg(bert_dir, intents, tmp_path, "train.max_steps=2"), progress=False)
    with pytest.warns(UserWarning, match="extending the run"):
        res = train_classifier(_cfg(bert_dir, intents, tmp_path, "train.max_steps=4"), progress=False)
    assert [h["step"] for h in res.history] == [1, 2, 3, 4]
    assert res.history[-1]["time_s"] >= res.history[1]["time_s"] > 0
    with pytest.raises(TrainingError, match="trained to step 4, past this config's 3 steps"):
        train_classifier(_cfg(bert_dir, intents, tmp_path, "train.max_steps=3"), progress=False)


def test_a_run_without_eval_rows_says_so_and_how_to_get_them(bert_dir, intents, tmp_path):
    cfg = _cfg(bert_dir, intents, tmp_path, "data.eval=null", "train.max_steps=1")
    with pytest.warns(ConfigWarning, match=r"no eval rows.*data.eval_split=0.1"):
        train_classifier(cfg, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # with eval rows: no note
        train_classifier(_cfg(bert_dir, intents, tmp_path / "b", "train.max_steps=1"), progress=False)
