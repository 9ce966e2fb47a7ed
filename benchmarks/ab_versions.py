"""In-process A/B of the training step between two versions of loratune's code, on shared base weights.

Two benchmark runs minutes apart on a shared VM drift by 10-20 %, more than a refactor should move a step. Here the
other version (a checkout's ``src/loratune``, copied and imported as ``loratune_old``) and the installed one run in
one process, on one copy of the base weights, interleaved, and the ratio is the median of the per-repeat ratios:

    git worktree add /tmp/old 91afe7a && python3 benchmarks/ab_versions.py /tmp/old/src/loratune --repeats 14
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_step as ts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the other version's package folder (a checkout's src/loratune)")
    ap.add_argument("--config", default="all-linear r16 dropout0.05", choices=list(ts.CONFIGS))
    ap.add_argument("--repeats", type=int, default=14)
    ap.add_argument("--old-thin", choices=["default", "off"], default="default",
                    help="for a version with the thin kernel (before 2026-12-02): leave it at its default or off")
    args = ap.parse_args(argv)
    if not (Path(args.old) / "__init__.py").is_file():
        ap.error(f"{args.old} is not a package folder (no __init__.py); give a checkout's src/loratune")
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(args.old, Path(tmp) / "loratune_old", ignore=shutil.ignore_patterns("__pycache__"))
        sys.path.insert(0, tmp)
        import loratune_old  # noqa: F401  (relative imports inside: it runs under its new name)

        import loratune
        from loratune.ops import causal_lm_loss as new_loss

        old_loss = __import__("loratune_old.losses", fromlist=["causal_lm_loss"]).causal_lm_loss
        if args.old_thin == "off":
            __import__("loratune_old.thin", fromlist=["use_kernel"]).use_kernel(False)
        cfg = ts.CONFIGS[args.config]
        a, b = ts.base_models(2)
        torch.manual_seed(0)
        old = loratune_old.get_lora_model(a, loratune_old.LoraConfig(**cfg, init_lora_weights=False)).train()
        torch.manual_seed(0)
        new = loratune.get_lora_model(b, loratune.LoraConfig(**cfg, init_lora_weights=False)).train()
        batch = ts.make_batch(4, 128, a.config.vocab_size)
        steps = {"old": (lambda m, bt: old_loss(m, *bt).backward(), old),
                 "new": (lambda m, bt: new_loss(m, *bt).backward(), new)}
        times = {k: [] for k in steps}
        for step, model in steps.values():  # warm-up
            ts.timed(step, model, batch)
        for i in range(args.repeats):
            for k in (("old", "new") if i % 2 else ("new", "old")):
                times[k].append(ts.timed(*steps[k], batch))
    ratio = statistics.median(x / y for x, y in zip(times["new"], times["old"]))
    print(f"{args.config} (old thin kernel: {args.old_thin}): new/old {ratio:.3f}, medians "
          f"{1e3 * statistics.median(times['new']):.0f} / {1e3 * statistics.median(times['old']):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
