"""Classification through the command line (task: classification): train, eval (accuracy, macro-F1, confusion
matrix), predict, text pairs, and every bad input as one line and exit code 2. A tiny random BERT for the mechanics;
the bundled MiniLM-L6 for the end-to-end accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratune.cli import main
from loratune.data.intents import make_intent_task

from conftest import save_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def intents(tmp_path_factory) -> tuple[Path, Path]:
    return make_intent_task(tmp_path_factory.mktemp("intents"), n_train=48, n_eval=20)


def _args(model, data, out, *extra) -> list[str]:
    return ["task=classification", f"model={model}", f"data.train={data[0]}", f"data.eval={data[1]}",
            f"output_dir={out}", "train.max_steps=3", "train.batch_size=8", "lora.r=4", "train.lr=1e-2",
            "data.max_seq_len=32", *extra]


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cfg") / "run.yaml"
    f.write_text("train:\n  seed: 0\n")
    return f


@pytest.fixture(scope="module")
def trained(bert_dir, intents, cfg_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(cfg_file), *_args(bert_dir, intents, out), "--no-progress"]) == 0
    return out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dry_run_shows_labels_example_and_params(capsys, bert_dir, intents, cfg_file, tmp_path):
    assert main(["train", str(cfg_file), *_args(bert_dir, intents, tmp_path / "o"), "--dry-run",
                 "train.class_weights=balanced"]) == 0
    out = capsys.readouterr().out
    assert "task: classification" in out and "labels: 5 (alarm: " in out and "class weights: alarm: 0.96" in out
    assert "'[CLS]'" in out and "trainable params:" in out and "estimated training time" in out
    assert not (tmp_path / "o").exists()


def test_train_writes_the_adapter_and_reports_held_out_accuracy(trained, capsys):
    for name in ("adapter_model.safetensors", "loratune_labels.json", "tokenizer.json"):
        assert (trained / "adapter" / name).is_file()
    assert (trained / "loss_curve.png").is_file()
    assert "eval_accuracy" in json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])


def test_eval_reports_accuracy_macro_f1_and_confusion(trained, intents, capsys):
    adapter = str(trained / "adapter")
    assert main(["eval", "--adapter", adapter, "--data", str(intents[1]), "--no-progress", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro_f1" in out and "adapter: confusion matrix" in out
    assert "base: confusion matrix" in out and "misses first" in out
    assert (trained / "confusion_matrix.png").stat().st_size > 5000
    assert main(["eval", "--adapter", adapter, "--data", str(intents[1]), "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["labels"] == ["alarm", "directions", "music", "shopping", "weather"]
    for r in (rows["base"], rows["adapter"]):
        cm = torch.tensor(r["confusion"])
        assert cm.sum() == r["n"] == 20 and r["accuracy"] == pytest.approx(cm.trace().item() / 20)
    # the same adapter accuracy as training logged at its last step
    logged = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])["eval_accuracy"]
    assert rows["adapter"]["accuracy"] == pytest.approx(logged, abs=1e-6)
    assert main(["eval", "--adapter", adapter, "--data", str(intents[1]), "--json", "--no-base",
                 "--no-progress"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"adapter", "labels", "plot"}
    plot = trained.parent / "elsewhere" / "cm.png"
    plot.parent.mkdir(exist_ok=True)
    assert main(["eval", "--adapter", adapter, "--data", str(intents[1]), "--json", "--no-base", "--no-progress",
                 "--plot", str(plot)]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(plot) and plot.stat().st_size > 5000


def test_predict_prints_labels_and_probabilities(trained, tmp_path, capsys):
    adapter = str(trained / "adapter")
    assert main(["predict", "--adapter", adapter, "wake me up at six", "play some jazz"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].endswith("\tplay some jazz")
    label, prob, _ = lines[0].split("\t")
    assert label in {"alarm", "directions", "music", "shopping", "weather"} and 0.2 <= float(prob) <= 1
    (tmp_path / "in.txt").write_text("wake me up at six\n\nplay some jazz\n")
    assert main(["predict", "--adapter", adapter, "--file", str(tmp_path / "in.txt"), "--json", "--all"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["text"] for g in got] == ["wake me up at six", "play some jazz"]
    for g in got:
        assert sum(g["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        assert g["probability"] == max(g["probabilities"].values()) == g["probabilities"][g["label"]]
    assert [g["label"] for g in got] == [line.split("\t")[0] for line in lines]  # same answers either way


def test_text_pairs_with_numeric_labels_csv_and_jsonl(bert_dir, cfg_file, tmp_path, capsys):
    words = ["cat", "dog", "sun", "car", "tree", "milk"]
    rows = [{"a": f"the {x}", "b": f"a {y}", "same": int(x == y)} for x in words for y in words]
    train = tmp_path / "pairs.csv"  # CSV labels are text ("0", "1"); the JSON eval file's are numbers
    train.write_text("a,b,same\n" + "".join(f"{r['a']},{r['b']},{r['same']}\n" for r in rows))
    ev = _write(tmp_path / "pairs_eval.jsonl", rows[:8])
    out = tmp_path / "run"
    assert main(["train", str(cfg_file), *_args(bert_dir, (train, ev), out, "data.text_column=a",
                 "data.text_pair_column=b", "data.label_column=same"), "--no-progress"]) == 0
    capsys.readouterr()
    labels = json.loads((out / "adapter" / "loratune_labels.json").read_text())
    assert labels == {"labels": ["0", "1"], "text_column": "a", "text_pair_column": "b", "label_column": "same"}
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(ev), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"]["n"] == 8
    assert main(["predict", "--adapter", str(out / "adapter"), "the cat", "--pair", "a cat"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in {"0", "1"}
    err = _error(capsys, ["predict", "--adapter", str(out / "adapter"), "the cat"])
    assert "classifies text pairs" in err and "--pair" in err


def test_bad_inputs_are_one_line_each(trained, bert_dir, intents, tiny_dir, cfg_file, tmp_path, capsys):
    adapter = str(trained / "adapter")
    unseen = _write(tmp_path / "unseen.jsonl", [{"text": "boil an egg", "label": "cooking"}])
    err = _error(capsys, ["eval", "--adapter", adapter, "--data", str(unseen)])
    assert "label 'cooking'" in err and "training never saw" in err and "'alarm'" in err
    empty = _write(tmp_path / "empty.jsonl", [{"text": "a", "label": ""}, {"text": "b", "label": None}])
    err = _error(capsys, ["train", str(cfg_file), *_args(bert_dir, (empty, intents[1]), tmp_path / "o")])
    assert "label column 'label' is empty" in err
    no_text = _write(tmp_path / "no_text.jsonl", [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}])
    err = _error(capsys, ["train", str(cfg_file), *_args(bert_dir, (no_text, intents[1]), tmp_path / "o")])
    assert "has no column 'text' (its columns: label, sentence); set data.text_column" in err
    err = _error(capsys, ["train", str(cfg_file), *_args(tiny_dir, intents, tmp_path / "o")])
    assert "decoder-only causal language model (LlamaForCausalLM)" in err and "all-minilm-l6-v2" in err
    err = _error(capsys, ["train", str(cfg_file), *_args(bert_dir, intents, tmp_path / "o"), "--dry-run",
                          "train.class_weights=[1, 2]"])
    assert "class_weights has 2 number(s)" in err
    assert not (tmp_path / "o").exists()
    for command in (["generate", "--adapter", adapter, "hello"], ["chat", "--adapter", adapter]):
        err = _error(capsys, command)
        assert "is a classification adapter" in err and "loratune predict" in err
    err = _error(capsys, ["predict", "--adapter", adapter])
    assert "nothing to classify" in err
    err = _error(capsys, ["predict", "--adapter", adapter, "x", "--pair", "y"])
    assert "single texts; drop --pair" in err


@pytest.mark.bundled
@pytest.mark.slow
def test_bundled_minilm_learns_intents_well_above_chance(tmp_path, cfg_file, capsys):
    """MiniLM-L6 on 120 generated requests, held out on 60 from unseen templates and slot values: chance is 20 %
    (5 balanced labels); the tuned classifier must reach 60 % and beat the base with a fresh head by 30 points."""
    data = make_intent_task(tmp_path / "data", n_train=120, n_eval=60)
    out = tmp_path / "run"
    args = ["task=classification", "model=all-minilm-l6-v2", f"data.train={data[0]}", f"data.eval={data[1]}",
            f"output_dir={out}", "train.epochs=2", "train.batch_size=8", "train.lr=2e-3", "lora.r=8",
            "data.max_seq_len=32", "train.warmup_ratio=0.1"]
    assert main(["train", str(cfg_file), *args, "--no-progress"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(["eval", "--adapter", str(out / "adapter"), "--data", str(data[1]), "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["adapter"]["accuracy"] >= 0.6, rows["adapter"]
    assert rows["adapter"]["accuracy"] >= rows["base"]["accuracy"] + 0.3, rows
