"""The run directory's policy: one run per output_dir, what a changed config is, the loss curve."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..fsutil import write_text
from .checkpoints import CHECKPOINTS, TrainingError


def check_output_dir(out: Path, config_text: str, overwrite: bool) -> None:
    """Refuse to mix two different runs in one output dir (read-only: nothing is written before setup works)."""
    saved = out / "run_config.yaml"
    old = saved.read_text() if saved.is_file() and not overwrite else config_text
    if old == config_text:
        return
    changed = config_changes(old, config_text)
    raise TrainingError(f"{out} holds a run with a different config ({changed}); pass --overwrite to replace it "
                        "or choose another output_dir")


def config_changes(old_text: str, new_text: str) -> str:
    """'train.lr: 0.001 -> 0.0002, ...' for the keys that differ between two dumped run configs."""
    def flat(d, prefix=""):
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    old, new = dict(flat(yaml.safe_load(old_text))), dict(flat(yaml.safe_load(new_text)))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)]
    return ", ".join(diffs[:5]) + (f" and {len(diffs) - 5} more" if len(diffs) > 5 else "") or "formatting"


def claim_output_dir(out: Path, config_text: str, overwrite: bool) -> None:
    """Mark ``out`` as this run's (rank 0, once the model and data are set up)."""
    if overwrite:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "run_config.yaml", config_text)


def write_loss_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train")
    ev = [h for h in history if "eval_loss" in h]
    if ev:
        ax.plot([h["step"] for h in ev], [h["eval_loss"] for h in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
