"""Classification from the command line: ``loratune train`` with ``task: classification``, ``loratune eval`` on a
classification adapter (accuracy, macro-F1, confusion matrix; the base with a fresh head vs the tuned model), and
``loratune predict`` (labels and probabilities of texts)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import devices
from ..errors import DataError, LoraTuneError
from .args import positive_int
from .output import print_summary

PLOT_NAME = "confusion_matrix.png"


# --- train ------------------------------------------------------------------------------------------------
def cmd_train_classifier(cfg, args) -> int:
    """``loratune train`` for ``task: classification`` (``--dry-run``: check and show, train nothing)."""
    from ..training.classify import train_classifier

    if args.dry_run:
        return _dry_run(cfg)
    result = train_classifier(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print_summary(result.history, result.seconds, result.adapter_dir)
    acc = [h["eval_accuracy"] for h in result.history if "eval_accuracy" in h]
    if acc:
        print(f"held-out accuracy {acc[-1]:.1%} on {len(result.data.eval)} rows (first {acc[0]:.1%}, best "
              f"{max(acc):.1%}); `loratune eval --adapter {result.adapter_dir} --data FILE` compares with the base")
    return 0


def _dry_run(cfg) -> int:
    import torch

    from ..adapters import get_lora_model
    from ..data.labels import prepare_labelled
    from ..training.classify import check_classification_run, class_weights, encode, load_classifier, weighted_loss
    from ..training.config import dump_run_config
    from ..training.optim import total_steps

    check_classification_run(cfg)
    print("# resolved config\n" + dump_run_config(cfg))
    device = devices.resolve_device(cfg.train.device, key="train.device")
    dtype = devices.resolve_dtype(cfg.model.dtype, device, key="model.dtype")
    print(f"# runs on {device} in {str(dtype).removeprefix('torch.')} (train.device={cfg.train.device}, "
          f"model.dtype={cfg.model.dtype})")
    data = prepare_labelled(cfg.data, seed=cfg.train.seed)
    weights = class_weights(cfg.train.class_weights, data.train_ids, data.labels)
    print("# data")
    for line in data.report:
        print("  " + line)
    if weights is not None:
        print("  class weights: " + ", ".join(f"{v}: {w:.3g}" for v, w in zip(data.labels.labels, weights.tolist())))
    torch.manual_seed(cfg.train.seed)
    model, tok = load_classifier(cfg.model.name, data.labels, dtype, device)
    first = data.train[0]
    batch = encode(tok, [first], cfg.data.max_seq_len)
    print("# one tokenized example")
    print(f"  {tok.convert_ids_to_tokens(batch['input_ids'][0].tolist())} -> label "
          f"{data.labels.labels[data.train_ids[0]]!r} (class {data.train_ids[0]})")
    lm = get_lora_model(model, cfg.lora_config())
    lm.print_trainable_parameters()
    lm.train()
    rows = data.train[:cfg.train.batch_size]
    inputs = encode(tok, rows, cfg.data.max_seq_len, device)
    targets = torch.tensor(data.train_ids[:len(rows)], device=device)
    for _ in range(2):  # the second of two runs: the first warms up
        start = time.perf_counter()
        weighted_loss(lm(**inputs).logits, targets, weights)[0].backward()
        seconds = time.perf_counter() - start
    _, steps = total_steps(len(data.train), cfg.train, 1)
    est = steps * cfg.train.grad_accum * seconds
    print(f"estimated training time on this machine: ~{est / 60:.1f} min ({steps} steps × {cfg.train.grad_accum} "
          f"batch(es) of {cfg.train.batch_size} rows × {seconds:.2f} s measured for one batch; evaluation not "
          "included)")
    return 0


# --- loading an adapter -----------------------------------------------------------------------------------------
def load_classifier_adapter(adapter: str, model_name: str | None, device: str = "auto", dtype: str = "float32"):
    """(LoraModel, tokenizer, LabelSet, max tokens per row) of a classification adapter on its base (or
    ``model_name``); the base's head is fresh (seeded: the same every time) and the adapter's head replaces it."""
    import torch
    from transformers import AutoTokenizer

    from ..adapters import LoraModel
    from ..adapters.files import recorded_base
    from ..data.labels import LabelSet
    from ..errors import AdapterFileError
    from ..training.classify import load_classifier

    labels = LabelSet.load(adapter)
    where = devices.resolve_device(device, key="--device")
    precision = devices.resolve_dtype(dtype, where, key="--dtype")
    name = model_name or recorded_base(adapter) or "all-minilm-l6-v2"
    torch.manual_seed(0)
    model, tok = load_classifier(name, labels, precision, where)
    if (Path(adapter) / "tokenizer_config.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(adapter)
        except (OSError, ValueError) as e:
            raise AdapterFileError(f"the tokenizer saved in {adapter} cannot be read ({str(e).splitlines()[0]}); "
                                   "re-copy the adapter, or delete its tokenizer files to use the base's") from None
    lm = LoraModel.from_pretrained(model, adapter)
    limit = getattr(model.config, "max_position_embeddings", 512) or 512
    return lm, tok, labels, min(512, int(limit))


# --- eval -------------------------------------------------------------------------------------------------
def cmd_eval_classifier(args) -> int:
    """``loratune eval`` on a classification adapter: accuracy, macro-F1 and the confusion matrix of the base with a
    fresh head and of the tuned model, as a table (or JSON) and a PNG beside the adapter."""
    import torch
    from tqdm.auto import tqdm

    from ..data.labels import read_labelled
    from ..training.class_metrics import confusion_table, scores, write_confusion_png
    from ..training.classify import predict_logits
    from .output import finite_or_none

    lm, tok, labels, max_len = load_classifier_adapter(args.adapter, args.model, args.device, args.dtype)
    rows = read_labelled(args.data, labels, "eval file")
    true = torch.tensor(labels.ids(rows, f"eval file {args.data}"))
    k = len(labels.labels)
    results: dict[str, dict] = {}
    predictions: dict[str, torch.Tensor] = {}

    def measure(name: str) -> None:
        with tqdm(total=len(rows), desc=f"{name} eval", disable=args.no_progress, mininterval=0, miniters=1) as bar:
            logits = predict_logits(lm, tok, rows, args.batch_size, max_len, bar.update)
        predictions[name] = logits.softmax(-1)
        results[name] = {**scores(true, logits.argmax(-1), k), "n": len(rows)}

    if not args.no_base:
        with lm.disable_adapter():
            measure("base")
    if not args.base_only:
        measure("adapter")
    names = [str(v) for v in labels.labels]
    plot = Path(getattr(args, "plot", None) or Path(args.adapter).resolve().parent / PLOT_NAME)
    try:
        write_confusion_png({f"{n} (accuracy {r['accuracy']:.1%})": r["confusion"] for n, r in results.items()},
                            names, plot)
    except OSError as e:
        raise LoraTuneError(f"cannot write the confusion matrix plot {plot} ({e.strerror or e}); make its directory "
                            "writable, or evaluate a copy of the adapter in a directory you can write to") from None
    shown = _examples(rows, true, predictions, labels, getattr(args, "show", 0) or 0)
    if args.json:
        out = {n: {**r, **({"examples": shown[n]} if shown else {})} for n, r in results.items()}
        print(json.dumps(finite_or_none({**out, "labels": list(labels.labels), "plot": str(plot)}), indent=2,
                         allow_nan=False))
        return 0
    print(f"{'':10s}{'accuracy':>12s}{'macro_f1':>12s}{'n':>8s}")
    for n, r in results.items():
        print(f"{n:10s}{r['accuracy']:>12.1%}{r['macro_f1']:>12.4f}{r['n']:>8d}")
    for n, r in results.items():
        print(f"\n{n}: confusion matrix (rows: true label, columns: predicted)\n"
              + confusion_table(r["confusion"], names))
    for n, some in shown.items():
        print(f"\n{n}: {len(some)} example(s), misses first")
        for e in some:
            print(f"  {'hit ' if e['match'] else 'MISS'} {e['text']!r}: got {e['prediction']!r} "
                  f"({e['probability']:.2f}), expected {e['reference']!r}")
    print(f"\nconfusion matrix plot: {plot}")
    return 0


def _examples(rows, true, predictions, labels, n: int) -> dict[str, list[dict]]:
    """Up to ``n`` rows per model, misses first (in file order within each group)."""
    out = {}
    for name, probs in predictions.items() if n else ():
        best = probs.argmax(-1)
        order = sorted(range(len(rows)), key=lambda i: bool(best[i] == true[i]))[:n]
        out[name] = [{"text": rows[i].text + (f" | {rows[i].pair}" if rows[i].pair else ""),
                      "prediction": labels.labels[int(best[i])], "probability": float(probs[i, best[i]]),
                      "reference": labels.labels[int(true[i])], "match": bool(best[i] == true[i])} for i in order]
    return out


# --- predict ------------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """The ``predict`` command's parser."""
    p = sub.add_parser("predict", help="labels and probabilities of texts, from a classification adapter",
                       description="Classify texts with a classification adapter (task: classification): prints "
                                   "each text's label and its probability.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--adapter", required=True, help="classification adapter directory")
    p.add_argument("--file", help="texts to classify: a .txt file (one per line) or a jsonl/json/csv/parquet file "
                                  "with the column the adapter was trained on")
    p.add_argument("--pair", help="the second text, for an adapter trained on text pairs (with one TEXT)")
    p.add_argument("--model", help="base model (default: the adapter's)")
    p.add_argument("--all", action="store_true", help="print every label's probability, not only the best")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the base model's precision (default: float32)")


def cmd_predict(args: argparse.Namespace) -> int:
    from ..data.labels import LabelSet
    from ..training.classify import predict_logits
    from .output import is_classifier

    if not is_classifier(args.adapter):
        raise LoraTuneError(f"{args.adapter} is not a classification adapter (its task_type is not SEQ_CLS); "
                            "predict needs one trained with task: classification (use generate for a chat adapter)")
    labels = LabelSet.load(args.adapter)
    rows = _predict_rows(args, labels)
    lm, tok, labels, max_len = load_classifier_adapter(args.adapter, args.model, args.device, args.dtype)
    probs = predict_logits(lm, tok, rows, args.batch_size, max_len).softmax(-1)
    for r, p in zip(rows, probs):
        best = int(p.argmax())
        every = {str(v): round(float(q), 4) for v, q in zip(labels.labels, p)}
        if args.json:
            print(json.dumps({"text": r.text, **({"pair": r.pair} if r.pair else {}), "label": labels.labels[best],
                              "probability": round(float(p[best]), 4),
                              **({"probabilities": every} if args.all else {})}), flush=True)
            continue
        text = r.text + (f" | {r.pair}" if r.pair else "")
        if args.all:
            ranked = sorted(every.items(), key=lambda kv: -kv[1])
            print(f"{text}\n  " + "  ".join(f"{v} {q:.3f}" for v, q in ranked), flush=True)
        else:
            print(f"{labels.labels[best]}\t{float(p[best]):.3f}\t{text}", flush=True)
    return 0


def _predict_rows(args, labels) -> list:
    """The texts to classify: the command line's, or ``--file``'s; a text-pair adapter needs both texts."""
    from ..data.labels import LabelledRow as row_type
    from ..data.labels import read_labelled

    if args.file and args.texts:
        raise LoraTuneError("give texts on the command line or --file, not both")
    if not args.file and not args.texts:
        raise LoraTuneError('nothing to classify: give one or more texts (loratune predict --adapter DIR "some '
                            'text") or --file FILE')
    pairwise = labels.text_pair_column is not None
    if args.file:
        if args.pair:
            raise LoraTuneError(f"--pair goes with one TEXT; a --file gives its pairs in column "
                                f"'{labels.text_pair_column or 'text_pair'}'")
        path = Path(args.file)
        if path.suffix.lower() == ".txt" and not pairwise:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read {path} as UTF-8 text ({e}); check the path") from None
            rows = [row_type(t.strip(), None, None, n) for n, t in enumerate(lines, 1) if t.strip()]
            if not rows:
                raise DataError(f"{path} has no text (every line is blank); put one text per line")
            return rows
        return read_labelled(args.file, labels, "input file", labels=False)
    if pairwise and (args.pair is None or len(args.texts) != 1):
        raise LoraTuneError("this adapter classifies text pairs: give one TEXT and its second text with --pair, or "
                            f"a --file with columns '{labels.text_column}' and '{labels.text_pair_column}'")
    if args.pair is not None and not pairwise:
        raise LoraTuneError("this adapter classifies single texts; drop --pair")
    return [row_type(t, args.pair, None, n) for n, t in enumerate(args.texts, 1)]
