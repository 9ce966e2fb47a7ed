"""Exact-match evaluation speed: ``loratune.training.evaluate.exact_match`` on base+adapter against transformers'
own ``generate`` on the merged model (the peer and the floor: the same batches, left padding, KV cache, greedy,
the same stop tokens), and against the adapter left unmerged (the old path).

Each repeat runs the three in turn (interleaved); the table gives medians, and each ratio is the median of the
per-repeat ratios (target: exact_match / merged generate ≤ 1.1). The answers of all three are checked equal.

    python3 benchmarks/eval_speed.py                       # bundled SmolLM2-135M, 60 dates rows, batch 32
    python3 benchmarks/eval_speed.py --model DIR --rows 8 --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratune import LoraConfig, get_lora_model, load_base_model
from loratune.data import DataConfig, prepare_eval
from loratune.data.dates_task import make_dates_task
from loratune.training.evaluate import exact_match, stop_ids


def peer_generate(model, tok, rows, batch_size: int, max_new_tokens: int) -> list[str]:
    """transformers' generate on a plain (merged) model, batched exactly as exact_match batches."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
    answers: dict[int, str] = {}
    pad, stops = tok.pad_token_id, stop_ids(tok)
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            chunk = order[i:i + batch_size]
            enc = tok.pad({"input_ids": [rows[j].prompt_ids for j in chunk]}, padding=True, return_tensors="pt",
                          padding_side="left")
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=stops)
            width = enc["input_ids"].shape[1]
            answers.update(zip(chunk, tok.batch_decode(out[:, width:], skip_special_tokens=True)))
    return [answers[i].strip() for i in range(len(rows))]


def build(model_name: str, rows: int, r: int, seed: int = 0):
    """(adapter model, merged plain model, tokenizer, eval rows): a random nonzero adapter on ``model_name``."""
    base, tok = load_base_model(model_name)
    with tempfile.TemporaryDirectory() as d:
        _, eval_file = make_dates_task(d, n_train=8, n_eval=rows, seed=seed)
        examples, _ = prepare_eval(DataConfig(train=str(eval_file)), tok)
    torch.manual_seed(seed)
    lm = get_lora_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                         init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    lm.eval()
    merged = copy.deepcopy(lm).merge_and_unload().eval()
    return lm, merged, tok, examples


def measure(args) -> dict:
    lm, merged, tok, rows = build(args.model, args.rows, args.r)
    runs = {
        "exact_match": lambda: [e["prediction"] for e in sorted(
            exact_match(lm, tok, rows, args.batch_size, args.max_new_tokens)["examples"],
            key=lambda e: e["prompt"])],
        "merged_generate": lambda: peer_generate(merged, tok, rows, args.batch_size, args.max_new_tokens),
        "unmerged_exact_match": lambda: [e["prediction"] for e in sorted(
            exact_match(lm, tok, rows, args.batch_size, args.max_new_tokens, merge=False)["examples"],
            key=lambda e: e["prompt"])],
    }
    # (answers compared in one order: exact_match's examples sorted by prompt, the peer's rows likewise)
    by_prompt = sorted(range(len(rows)), key=lambda i: tok.decode(rows[i].prompt_ids, skip_special_tokens=True))
    times: dict[str, list[float]] = {k: [] for k in runs}
    answers: dict[str, list[str]] = {}
    for _ in range(args.warmup + args.repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            got = run()
            times[name].append(time.perf_counter() - t)
            answers[name] = [got[i] for i in by_prompt] if name == "merged_generate" else got
    times = {k: v[args.warmup:] for k, v in times.items()}
    ratio = [a / b for a, b in zip(times["exact_match"], times["merged_generate"])]
    ratio_unmerged = [a / b for a, b in zip(times["unmerged_exact_match"], times["merged_generate"])]
    same = answers["exact_match"] == answers["merged_generate"]
    return {"model": args.model, "rows": len(rows), "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens, "r": args.r, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_exact_match_vs_merged_generate": statistics.median(ratio),
            "ratio_unmerged_vs_merged_generate": statistics.median(ratio_unmerged),
            "answers_equal_to_merged_generate": same,
            "answers_equal_unmerged": answers["unmerged_exact_match"] == answers["merged_generate"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    res = measure(args)
    print(f"{res['rows']} rows, batch {res['batch_size']}, {res['max_new_tokens']} new tokens, r={res['r']}, "
          f"{res['threads']} threads, medians of {res['repeats']}")
    for k, v in res["median_s"].items():
        print(f"  {k:22s} {v:8.2f} s")
    print(f"  exact_match / merged generate: {res['ratio_exact_match_vs_merged_generate']:.3f} (target ≤ 1.1); "
          f"unmerged / merged: {res['ratio_unmerged_vs_merged_generate']:.3f}; "
          f"same answers: {res['answers_equal_to_merged_generate']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
