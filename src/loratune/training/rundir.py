"""The run directory's policy: one run per output_dir, what a changed config is, the loss curve."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import yaml

from ..errors import ConfigWarning
from ..fsutil import writable_place, write_text
from .checkpoints import (
    CHECKPOINTS,
    TrainingError,
    config_diff,
    flat_config,
    latest_checkpoint,
    length_only,
    remove_stale_temps,
)

CHOSEN = "# chosen: "  # run_config.yaml's trailing comments: what `auto` chose (YAML readers skip them)
OUTPUTS = ("adapter", "merged", "metrics.jsonl", "loss_curve.png", "data_report.txt", "lr_search.json",
           "lr_search.png")  # what a run writes


def check_output_dir(out: Path, config_text: str, overwrite: bool) -> None:
    """Refuse an output_dir that cannot hold this run, or that holds another run that trained (read-only: nothing
    is written before set-up works). A run that never finished a step may be taken over by a corrected command."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file; choose a directory (it is created if missing)")
    problem = writable_place(out)
    if problem:
        raise TrainingError(f"output_dir {out} cannot be written ({problem}); choose a directory you can write to")
    saved = out / "run_config.yaml"
    foreign = [n for n in (*OUTPUTS, CHECKPOINTS) if (out / n).exists()] if not saved.is_file() else []
    if foreign:  # never written by a run (no run_config.yaml): loratune must not replace or delete them
        raise TrainingError(f"output_dir {out} holds {', '.join(foreign)} but no run_config.yaml, so it is not a "
                            "loratune run's directory; choose another output_dir (nothing was changed)")
    diff = config_diff(saved_config(saved), config_text) if saved.is_file() and not overwrite else {}
    if not diff:
        return
    changed = config_changes(diff)
    if length_only(diff) and latest_checkpoint(out) is not None:
        trained = int(latest_checkpoint(out).name.rsplit("-", 1)[1])
        steps = flat_config(config_text).get("train.max_steps")
        if isinstance(steps, int) and steps < trained:  # (said before the model loads, and without the note below)
            raise past_length(out, trained, steps)
        warnings.warn(f"extending the run in {out} ({changed}): it continues from {latest_checkpoint(out).name} "
                      "with its learning-rate schedule recomputed for the new length", ConfigWarning, stacklevel=3)
        return
    if latest_checkpoint(out) is None:  # it never trained a step: nothing of value to protect
        warnings.warn(f"{out} holds a run that never finished a step, with another config ({changed}); this run "
                      "takes its place", ConfigWarning, stacklevel=3)
        return
    raise TrainingError(f"{out} holds a run with a different config ({changed}); pass --overwrite to replace it "
                        "or choose another output_dir")


def past_length(out: Path, trained: int, steps: int) -> TrainingError:
    """The refusal of a config shorter than the ``trained`` steps its output_dir's run already has."""
    return TrainingError(f"{out} holds a run trained to step {trained}, past this config's {steps} steps; keep its "
                         "length (or raise it to extend the run), or pass --overwrite to start over")


def config_changes(diff: dict) -> str:
    """'train.lr: 0.001 -> 0.0002, ...' for a (non-empty) ``config_diff``."""
    diffs = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items()]
    return ", ".join(diffs[:5]) + (f" and {len(diffs) - 5} more" if len(diffs) > 5 else "")


def claim_output_dir(out: Path, config_text: str, overwrite: bool) -> None:
    """Mark ``out`` as this run's (rank 0, once the model and data are set up). With ``overwrite``, the previous
    run's outputs go first (only what a run writes: other files in ``out`` are left alone); what a killed write
    left behind goes in any case."""
    saved = out / "run_config.yaml"
    diff = config_diff(saved_config(saved), config_text) if saved.is_file() and not overwrite else {}
    replaced = overwrite or (bool(diff) and not (length_only(diff) and latest_checkpoint(out)))
    if saved.is_file() and replaced:  # replacing a run: its outputs go
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temps(out):
        warnings.warn(f"removed {stale.name}, left in {stale.parent} by an interrupted write", ConfigWarning,
                      stacklevel=3)
    write_text(out / "run_config.yaml", config_text)


def saved_config(path: Path) -> str:
    """A run's ``run_config.yaml`` as the run dumped it: without the comments that say what ``auto`` chose.
    A file edited into invalid YAML is a TrainingError naming it."""
    text = "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith(CHOSEN))
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TrainingError(f"{path} is not valid YAML ({getattr(e, 'problem', None) or e}); restore the config the "
                            "run was made with, or pass --overwrite to start the run over") from None
    return text


def note_choices(out: Path, config_text: str, choices: dict[str, object]) -> None:
    """Write ``run_config.yaml`` again with what ``auto`` chose (``{"train.lr": 0.0015}``) as trailing comments:
    the config still says ``auto`` (what the user asked for, and what a resumed run is compared with), and the
    comments say what that meant for this run."""
    write_text(out / "run_config.yaml", config_text + "".join(f"{CHOSEN}{k}: {v}\n" for k, v in choices.items()))


def read_history(log_path: Path, upto: int) -> list[dict]:
    """The metrics a resumed run keeps: ``metrics.jsonl``'s records up to step ``upto``. A torn last line (a kill
    while appending) is dropped with a warning; a damaged line elsewhere is an error naming it."""
    if not upto or not log_path.is_file():
        return []
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    history = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                warnings.warn(f"{log_path}: its last line was cut off (an interrupted run); dropped",
                              ConfigWarning, stacklevel=3)
                break
            raise TrainingError(f"{log_path} line {n} is damaged; delete the file to keep training (its curve is "
                                "then lost) or rerun with --overwrite") from None
        if isinstance(record, dict) and record.get("step", upto + 1) <= upto:
            history.append(record)
    return history


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
