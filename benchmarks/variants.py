"""Time of one DoRA training step (forward + backward, no optimizer) against loratune's plain LoRA step and PEFT's
DoRA step, on the bundled SmolLM2-135M (fp32, CPU by default), all linear layers at r16.

Contestants, on one shared copy of the base weights (``train_step.base_models``), with the same adapter weights for
the two DoRA models (checked: their gradients are compared on the first batch):

* lora:      loratune's LoRA step (``train_step.loratune_step``: fused LoRA linears, chunked loss);
* dora:      loratune's DoRA step, the same step with ``use_dora=True``;
* peft_dora: PEFT's DoRA step (``model(labels=...).loss.backward()``), as ``train_step.py`` times PEFT's LoRA.

The steps are interleaved (the order alternating), repeated, and compared by the median of within-repeat ratios
(see ``train_step.py``). Targets (issue 25): dora/lora ≤ 1.3, dora/peft_dora ≤ 0.7.

    python benchmarks/variants.py                       # both dropout settings, 7 repeats at 4×128
    python benchmarks/variants.py --dropouts 0 --repeats 5 --json out.json

``--quality`` instead trains LoRA, DoRA, PiSSA and AdaLoRA adapters on the quickstart task (``loratune
quickstart``'s data and settings: 40 steps at batch 8, r16, lr 2e-3) one after another, from the same seed, and
measures each one's held-out exact match (greedy, 100 rows) and eval loss:

    python benchmarks/variants.py --quality --json quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402  (the house helpers: batches, timing, ratios)


def build(dropout: float, args):
    """(loratune LoRA, loratune DoRA, PEFT DoRA) on shared base weights, the DoRA pair with identical adapters."""
    import peft

    from loratune import LoraConfig, get_lora_model
    from loratune.adapters.state import adapter_tensors

    lora_base, dora_base, peft_base = ts.base_models(3, args)
    cfg = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    torch.manual_seed(0)
    lora = get_lora_model(lora_base, LoraConfig(**cfg, init_lora_weights=False))
    torch.manual_seed(0)
    dora = get_lora_model(dora_base, LoraConfig(**cfg, init_lora_weights=False, use_dora=True))
    pm = peft.get_peft_model(peft_base, peft.LoraConfig(**cfg, use_dora=True, task_type="CAUSAL_LM"))
    weights = {k: v.detach().clone() for k, v in adapter_tensors(dora.model, dora.peft_config["default"],
                                                                  "default").items()}
    result = peft.set_peft_model_state_dict(pm, weights)
    assert not result.unexpected_keys, result.unexpected_keys
    for m in (lora, dora, pm):
        m.train()
    return lora, dora, pm


def same_function(dora, pm, batch) -> float:
    """The largest relative difference between loratune's and PEFT's DoRA gradients (A, B, m) on ``batch``, in eval
    mode (no dropout: there the two DoRA forms are one function)."""
    from loratune.adapters.state import adapter_tensors

    dora.eval(), pm.eval()
    ts.loratune_step(dora, batch)
    ts.peft_step(pm, batch)
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    worst = 0.0
    for key, p in adapter_tensors(dora.model, dora.peft_config["default"], "default").items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight").replace(
            ".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        worst = max(worst, ((p.grad - theirs[name]).norm() / theirs[name].norm()).item())
    ts.zero_grads(dora), ts.zero_grads(pm)
    dora.train(), pm.train()
    return worst


def bench(dropout: float, args) -> dict:
    lora, dora, pm = build(dropout, args)
    vocab = lora.model.config.vocab_size
    batch = ts.make_batch(args.batch, args.seq, vocab)
    grad_rel = same_function(dora, pm, batch)
    steps = {"lora": (ts.loratune_step, lora), "dora": (ts.loratune_step, dora), "peft_dora": (ts.peft_step, pm)}
    for step, model in steps.values():  # warm up (kernels, allocator)
        ts.timed(step, model, batch)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.repeats):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            step, model = steps[name]
            times[name].append(ts.timed(step, model, batch))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "dropout": dropout, "median_s": med, "times_s": times, "dora_grad_rel_vs_peft": grad_rel,
        "dora/lora": ts.paired_ratio(times["dora"], times["lora"]),
        "dora/lora_quartiles": ts.ratio_spread(times["dora"], times["lora"]),
        "dora/peft_dora": ts.paired_ratio(times["dora"], times["peft_dora"]),
        "dora/peft_dora_quartiles": ts.ratio_spread(times["dora"], times["peft_dora"]),
    }


# AdaLoRA: budget 16 per layer on average (LoRA's r) pruned from 24 (the paper's 1.5×), warm-up 10 % of the steps,
# final fine-tuning 20 %, PEFT's other defaults (deltaT 1, β 0.85, orth_reg_weight 0.5)
VARIANTS = {"LoRA": [], "DoRA": ["lora.use_dora=true"], "PiSSA": ["lora.init_lora_weights=pissa"],
            "AdaLoRA": ["lora.use_adalora=true", "lora.init_r=24", "lora.target_r=16", "lora.tinit=4",
                        "lora.tfinal=8"]}


def quality(names: list[str], out_dir: str) -> list[dict]:
    """Held-out exact match and eval loss of each variant trained as ``loratune quickstart`` trains (see above)."""
    from pathlib import Path

    from loratune.cli.quickstart import QUICKSTART
    from loratune.data import prepare
    from loratune.data.dates_task import make_dates_task
    from loratune.models import load_base_model
    from loratune.training.config import load_run_config
    from loratune.training.evaluate import exact_match
    from loratune.training.loop import fit_to_model, train

    rows = []
    for name in names:
        out = Path(out_dir) / name
        train_file, eval_file = make_dates_task(out / "data", n_train=600, n_eval=100, seed=0)
        cfg = load_run_config(None, [f"data.train={train_file}", f"data.eval={eval_file}", f"output_dir={out}",
                                     "train.eval_every=40", *VARIANTS[name]], defaults=QUICKSTART)
        model, tok = load_base_model(cfg.model.name)
        data = prepare(fit_to_model(cfg.data, model), tok, seed=cfg.train.seed)
        started = time.time()
        result = train(cfg, overwrite=True, model_and_tokenizer=(model, tok), data=data, progress=False)
        seconds = time.time() - started
        em = exact_match(result.model, tok, data.eval, cfg.train.eval_batch_size, 16)
        eval_loss = next((h["eval_loss"] for h in reversed(result.history) if "eval_loss" in h), None)
        pattern = result.model.peft_config["default"].rank_pattern if "use_adalora=true" in " ".join(VARIANTS[name]) \
            else None  # AdaLoRA: the kept triplets at the end (the budget) and their spread over layers
        rows.append({"variant": name, "overrides": VARIANTS[name], "exact_match": em["exact_match"],
                     "eval_loss": eval_loss, "train_s": seconds, "steps": cfg.train.max_steps,
                     "first_loss": result.history[0].get("loss"), "last_loss": result.history[-1].get("loss"),
                     "sample": em["samples"][0],
                     **({"kept_ranks": {k: sum(v) for k, v in pattern.items()}} if pattern else {})})
        print(f"{name:6s} exact match {em['exact_match']:.1%}  eval loss {eval_loss}  train {seconds:.0f}s  "
              f"e.g. {em['samples'][0]['prediction']!r} for {em['samples'][0]['reference']!r}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--dropouts", type=float, nargs="*", default=[0.0, 0.05])
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--quality", action="store_true", help="held-out exact match of the variants instead")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/variants-quality", help="--quality: where the runs are written")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quality:
        results = {"threads": args.threads, "quality": quality(args.variants, args.out)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        return
    full = ts.parse_args([])  # the model, device, dtype train_step would use: bundled SmolLM2-135M, CPU, fp32
    for k in ("batch", "seq", "repeats", "threads"):
        setattr(full, k, getattr(args, k))
    started = time.time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = {"batch": args.batch, "seq": args.seq, "repeats": args.repeats, "threads": args.threads,
               "loadavg_1min_at_start": load, "configs": []}
    for p in args.dropouts:
        r = bench(p, full)
        results["configs"].append(r)
        print(f"all-linear r16 dropout {p}: lora {r['median_s']['lora']:.3f}s  dora {r['median_s']['dora']:.3f}s  "
              f"peft_dora {r['median_s']['peft_dora']:.3f}s  |  dora/lora {r['dora/lora']:.3f} "
              f"[{r['dora/lora_quartiles'][0]:.3f}, {r['dora/lora_quartiles'][1]:.3f}]  dora/peft_dora "
              f"{r['dora/peft_dora']:.3f} [{r['dora/peft_dora_quartiles'][0]:.3f}, "
              f"{r['dora/peft_dora_quartiles'][1]:.3f}]  grads vs PEFT {r['dora_grad_rel_vs_peft']:.1e}",
              flush=True)
    results["wall_s"] = time.time() - started
    results["loadavg_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
