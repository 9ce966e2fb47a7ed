"""Is a fine-tuning update low-rank? Full fine-tune vs LoRAs extracted from it vs LoRAs trained directly.

On the quickstart task (``loratune.data.dates_task``: written dates -> ISO dates, the quickstart's data config and
step count), this script

1. fully fine-tunes the weights of every targeted Linear (by default all of them but the output head, in every
   decoder layer: the modules LoRA's "all-linear" targets; embeddings, norms and the head stay frozen, so the whole
   update is one a LoRA of those modules could hold),
2. extracts LoRAs of rank r from that update with ``loratune.compose.extract_lora`` (truncated SVD of W_tuned − W_base
   per module) for each r in ``--ranks``,
3. trains a LoRA of each rank directly (α = 2r, the quickstart's learning rate, the same rows in the same order),

and reports held-out exact match (greedy, as the quickstart measures it) and held-out loss for each, next to the
base model and the full fine-tune. Every model is evaluated as a plain model with its ΔW merged into the weights.

    python benchmarks/lowrank_experiment.py --json benchmarks/results/lowrank.json --plot docs/lowrank.png

``--model`` takes any causal LM folder with a chat template (the smoke test runs a tiny random Llama).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratune import LoraConfig, get_lora_model, load_base_model
from loratune.adapters import merged_state_dict
from loratune.adapters.targets import all_linear_targets, layer_index, name_matches
from loratune.cli.quickstart import QUICKSTART
from loratune.compose import adapter_from_model, analyze_adapter, extract_lora
from loratune.data import collate, prepare
from loratune.data.dates_task import make_dates_task
from loratune.data.schema import END_TOKENS
from loratune.training.config import load_run_config
from loratune.training.evaluate import eval_loss, exact_match, response_loss_sum
from loratune.training.loop import fit_to_model
from loratune.training.optim import lr_lambda


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model name or folder")
    p.add_argument("--ranks", default="1,4,16,64", help="comma-separated LoRA ranks")
    p.add_argument("--steps", type=int, default=40, help="training steps of every run (the quickstart's 40)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=100, help="held-out rows")
    p.add_argument("--full-lr", type=float, default=1e-4, help="AdamW learning rate of the full fine-tune")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="learning rate of the direct LoRAs (quickstart's)")
    p.add_argument("--layers", default=None, help="decoder layers to tune, e.g. 20-29 (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of exact match")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--check-generation", action="store_true",
                   help="also measure the full fine-tune's exact match by generation, as the quickstart does")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of exact match and loss against r")
    args = p.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks must be whole numbers separated by commas, got {args.ranks!r}")
    if not args.ranks or min(args.ranks) < 1:
        p.error("--ranks must be whole numbers ≥ 1")
    if min(args.steps, args.batch_size, args.n_train, args.n_eval) < 1:
        p.error("--steps, --batch-size, --n-train and --n-eval must be at least 1")
    if args.layers is not None:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", args.layers)
        if not m:
            p.error(f"--layers must look like 20-29 or 5, got {args.layers!r}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        args.layers = list(range(lo, hi + 1))
    return args


def target_paths(model: torch.nn.Module, layers: list[int] | None) -> list[str]:
    """Full paths of the tuned Linears: all-linear's modules, in ``layers`` only when given."""
    leaves = all_linear_targets(model)
    paths = [n for n, m in model.named_modules() if n and isinstance(m, torch.nn.Linear) and name_matches(n, leaves)]
    if layers is not None:
        paths = [n for n in paths if layer_index(n, None) in layers]
    if not paths:
        raise SystemExit(f"--layers {layers}: no Linear of the model lies in those layers")
    return paths


def fit(model: torch.nn.Module, params: list[torch.Tensor], examples, pad_id: int, args, lr: float) -> list[float]:
    """AdamW (no weight decay) with the quickstart's schedule (5 % warmup, cosine), gradient clipping at 1, and the
    same batches in the same order for every run. Returns the training loss per step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", math.ceil(0.05 * args.steps), args.steps))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    model.train()
    losses = []
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        total, n = response_loss_sum(model, collate([examples[i] for i in idx], pad_id))
        loss = total / max(n, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        every = max(1, args.steps // 4)
        if (step + 1) % every == 0:
            print(f"    step {step + 1}/{args.steps}: loss {sum(losses[-every:]) / every:.4f}", flush=True)
    model.eval()
    return losses


def stop_ids(tok) -> set[int]:
    """The tokens that end a greedy answer (as ``exact_match``'s generation stops): EOS and the chat end tokens."""
    ids = {tok.eos_token_id} | {tok.convert_tokens_to_ids(t) for t in END_TOKENS}
    return {i for i in ids if isinstance(i, int) and i != tok.unk_token_id}


@torch.no_grad()
def forced_eval(model, examples, pad_id: int, stops: set[int], batch_size: int = 16) -> dict:
    """Held-out loss (mean over response tokens, as ``eval_loss``) and greedy exact match from ONE teacher-forced
    forward pass per batch: greedy decoding reproduces the reference iff at every response position up to and
    including its first end token the argmax is the reference token. That is ``exact_match``'s generation
    check without generating (it differs only where two tokenizations decode to the same text); on this loaded
    2-core machine it is ~10× cheaper. ``--check-generation`` measures both on the full fine-tune."""
    total, count, hits = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum"))
        count += int(mask.sum())
        pred = logits.argmax(-1)
        for row in range(len(chunk)):
            pos = mask[row].nonzero().flatten().tolist()
            ref = labels[row, pos].tolist()
            end = next((k for k, t in enumerate(ref) if t in stops), len(ref) - 1)
            hits += pred[row, pos[:end + 1]].tolist() == ref[:end + 1]
    return {"exact_match": hits / len(examples), "loss": total / max(count, 1)}


def evaluate(model, tok, data, args, generate: bool = False) -> dict:
    model.eval()
    out = forced_eval(model, data.eval, tok.pad_token_id, stop_ids(tok))
    if generate:
        out["exact_match_generated"] = exact_match(model, tok, data.eval, batch_size=args.eval_batch_size,
                                                   max_new_tokens=args.max_new_tokens)["exact_match"]
        out["loss_eval_loss"] = eval_loss(model, data.eval, tok.pad_token_id, batch_size=16)["loss"]
    return out


def run(args) -> dict:
    t0 = time.time()

    def say(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file = make_dates_task(Path(tmp) / "data", n_train=args.n_train, n_eval=args.n_eval,
                                                seed=args.seed)
        cfg = load_run_config(None, [f"data.train={train_file}", f"data.eval={eval_file}",
                                     f"output_dir={Path(tmp) / 'out'}"], defaults=QUICKSTART)
        base, tok = load_base_model(args.model)
        data = prepare(fit_to_model(cfg.data, base), tok, seed=args.seed)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    pad = tok.pad_token_id
    paths = target_paths(base, args.layers)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    n_tuned = sum(base.get_submodule(p).weight.numel() for p in paths)
    say(f"{len(data.train)} train / {len(data.eval)} held-out rows; {len(paths)} Linears "
        f"({n_tuned / 1e6:.1f} M weights) tuned")
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "modules": len(paths), "tuned_weights": n_tuned, "rows": []}

    def record(kind: str, r: int | None, model, generate: bool = False, **extra) -> None:
        row = {"kind": kind, "r": r, **evaluate(model, tok, data, args, generate), **extra}
        results["rows"].append(row)
        say(f"{kind:10s} r={r!s:4s} exact match {row['exact_match']:.1%}  loss {row['loss']:.4f}"
            + (f"  (generated: exact match {row['exact_match_generated']:.1%}, eval_loss "
               f"{row['loss_eval_loss']:.4f})" if generate else ""))

    record("base", None, base)
    tuned = copy.deepcopy(base)
    weights = [tuned.get_submodule(p).weight for p in paths]
    for w in weights:
        w.requires_grad_(True)
    ts = time.time()
    losses = fit(tuned, weights, data.train, pad, args, args.full_lr)
    for w in weights:
        w.requires_grad_(False)
    record("full", None, tuned, args.check_generation, train_seconds=time.time() - ts, final_train_loss=losses[-1])

    probe = copy.deepcopy(base)
    for r in args.ranks:
        groups: dict[int, list[str]] = {}  # r is capped per module at its full rank min(out, in)
        for p in paths:
            groups.setdefault(min(r, *base.get_submodule(p).weight.shape), []).append(p)
        merged, energy = base_sd, []
        for rank, group in groups.items():
            adapter, report = extract_lora(base, tuned, rank, target_modules=group)
            merged = merged_state_dict(merged, adapter.tensors, adapter.config)
            energy += report.energy_kept.values()
        probe.load_state_dict(merged)
        record("extracted", r, probe, energy_kept_mean=sum(energy) / len(energy), energy_kept_min=min(energy))
    del probe

    for r in args.ranks:
        torch.manual_seed(args.seed)
        lm = get_lora_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                            target_modules=paths))
        ts = time.time()
        losses = fit(lm, [p for p in lm.parameters() if p.requires_grad], data.train, pad, args, args.lora_lr)
        seconds = time.time() - ts
        used = analyze_adapter(adapter_from_model(lm, "default"))  # which rank the trained ΔW actually uses
        r90 = sorted(m.rank_90 for m in used.modules)
        record("lora", r, lm.merge_and_unload(), train_seconds=seconds, final_train_loss=losses[-1],
               analyzed_recommended_r=used.recommended_r, median_rank_90=r90[len(r90) // 2])
    results["seconds"] = time.time() - t0
    return results


def table(results: dict) -> str:
    rows = {(x["kind"], x["r"]): x for x in results["rows"]}
    ranks = results["args"]["ranks"]
    lines = ["| r | extracted from full FT: exact match | loss | energy of ΔW_full kept (mean) | LoRA trained at r: "
             "exact match | loss | its 90 %-energy rank (median) |", "|---|---|---|---|---|---|---|"]
    for r in ranks:
        e, t = rows[("extracted", r)], rows[("lora", r)]
        lines.append(f"| {r} | {e['exact_match']:.1%} | {e['loss']:.4f} | {e['energy_kept_mean']:.1%} "
                     f"| {t['exact_match']:.1%} | {t['loss']:.4f} | {t['median_rank_90']} |")
    for kind, label in (("full", "full fine-tune"), ("base", "base model")):
        x = rows[(kind, None)]
        lines.append(f"| {label} | {x['exact_match']:.1%} | {x['loss']:.4f} | | | | |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    ranks = results["args"]["ranks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "exact_match", "held-out exact match"), (axes[1], "loss", "held-out loss")):
        for kind, style in (("extracted", "o-"), ("lora", "s--")):
            ys = [next(x[key] for x in rows if x["kind"] == kind and x["r"] == r) for r in ranks]
            ax.plot(ranks, ys, style, label="extracted from full FT" if kind == "extracted" else "LoRA trained")
        for kind, color in (("full", "k"), ("base", "grey")):
            y = next(x[key] for x in rows if x["kind"] == kind)
            ax.axhline(y, color=color, linestyle=":", label="full fine-tune" if kind == "full" else "base model")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(label)
        if key == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
