"""The main job: fine-tune the bundled SmolLM2-135M-Instruct to write dates in ISO format.

Generates the task (train and held-out splits), measures the base model's held-out exact match,
trains a LoRA adapter, measures again, and writes the adapter, the merged model and the loss curve.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import devices
from ..data import prepare
from ..data.dates_task import make_dates_task
from ..errors import LoraTuneError
from ..formats.merged import save_merged
from ..models import load_base_model
from ..training.config import load_run_config
from ..training.evaluate import exact_match
from ..training.loop import fit_to_model, train
from ..training.rundir import check_output_dir
from .output import print_summary

# Tuned on a 2-core CPU to finish well inside 5 minutes: short rows, a high LoRA learning rate.
QUICKSTART = [
    "train.max_steps=40", "train.batch_size=8", "train.lr=2e-3", "train.warmup_ratio=0.05",
    "train.scheduler=cosine", "train.eval_every=0", "lora.r=16", "lora.alpha=32", "lora.dropout=0.05",
    "data.max_seq_len=96", "data.system_prompt=Answer with the date only.",
]


def run_quickstart(out: Path, overrides: list[str] = (), progress: bool = True, n_train: int = 600,
                   n_eval: int = 100) -> dict:
    """Run the main job into ``out``; returns held-out exact match before and after, and the seconds taken."""
    t0 = time.time()
    if out.is_dir() and any(out.iterdir()) and not (out / "run_config.yaml").is_file():
        raise LoraTuneError(f"--out {out} is not empty and holds no earlier run; give a new or empty directory "
                            "(quickstart writes data/, adapter/, merged/ and more into it)")
    check_output_dir(out, "", overwrite=True)  # a file, or unwritable: said before anything is written
    train_file, eval_file = make_dates_task(out / "data", n_train=n_train, n_eval=n_eval, seed=0)
    cfg = load_run_config(None, [f"data.train={train_file}", f"data.eval={eval_file}", f"output_dir={out}",
                                 *overrides], defaults=QUICKSTART)
    device = devices.resolve_device(cfg.train.device, key="train.device")
    dtype = devices.resolve_dtype(cfg.model.dtype, device, key="model.dtype")
    model, tok = load_base_model(cfg.model.name, dtype=dtype, device=device, **cfg.model.load_kwargs())
    print(f"[{time.time() - t0:5.0f}s] base model on {device} in {str(dtype).removeprefix('torch.')}", flush=True)
    data = prepare(fit_to_model(cfg.data, model), tok, seed=cfg.train.seed)
    bs, mnt = cfg.train.eval_batch_size, 16
    print(f"[{time.time() - t0:5.0f}s] measuring the base model on {len(data.eval)} held-out rows", flush=True)
    before = exact_match(model, tok, data.eval, bs, mnt)

    print(f"[{time.time() - t0:5.0f}s] fine-tuning", flush=True)
    result = train(cfg, overwrite=True, model_and_tokenizer=(model, tok), data=data, progress=progress)
    after = exact_match(result.model, tok, data.eval, bs, mnt)
    print(f"[{time.time() - t0:5.0f}s] merging", flush=True)
    if dtype in (torch.bfloat16, torch.float16):  # ΔW added in float32, the sum rounded once to the base's dtype
        result.model.to(torch.float32)
    save_merged(result.model, tok, out / "merged", dtype=dtype if dtype != torch.float32 else None)

    print_summary(result.history, result.seconds, result.adapter_dir)
    print_exact_match(before, after)
    print(f"\nadapter:      {result.adapter_dir}\nmerged model: {out / 'merged'}\n"
          f"loss curve:   {out / 'loss_curve.png'}\ntotal time:   {time.time() - t0:.0f} s")
    eval_loss = next((h["eval_loss"] for h in reversed(result.history) if "eval_loss" in h), None)
    return {"before": before["exact_match"], "after": after["exact_match"], "eval_loss": eval_loss,
            "seconds": time.time() - t0, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}


def print_exact_match(before: dict, after: dict) -> None:
    """The summary's exact-match lines: each model's share, with one hit and one miss labelled as such."""
    print("\nheld-out exact match (ISO dates)")
    for label, em in (("base model", before), ("with LoRA", after)):
        print(f"  {label:12s} {em['exact_match']:6.1%}")
        for kind, match in (("hit", True), ("miss", False)):
            e = next((e for e in em["examples"] if e["match"] is match), None)
            print(f"      {kind:4s}  " + ("(none)" if e is None else
                                         f"{e['prediction']!r}" + ("" if match else f", expected {e['reference']!r}")))


def cmd_quickstart(args) -> int:
    flags = [f"train.device={args.device}"] if args.device else []
    flags += [f"model.dtype={args.dtype}"] if args.dtype else []
    run_quickstart(Path(args.out), [*args.overrides, *flags], progress=not args.no_progress)
    return 0
