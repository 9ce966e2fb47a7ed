"""Early stopping on the eval loss and the best adapter kept (``train.early_stopping_patience``, ``train.load_best``).

The state is rebuilt from the run's metrics (the eval losses logged up to the checkpoint a run resumes from), so a
resumed run stops where an uninterrupted one would, and a rerun of a run that stopped early trains nothing. The
best adapter's weights are kept in memory and, on rank 0, in ``checkpoints/best/`` (written whole or not at all),
whence a resumed run reads them back; they are the exact tensors of that step, so the final adapter is bit-exact.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ..errors import ConfigWarning
from ..fsutil import atomic_dir, read_tensors, save_json, save_tensors
from .checkpoints import CHECKPOINTS
from .lr_search import restore, snapshot

BEST = "best"


class BestKeeper:
    """Tracks the best eval loss of a run, counts evaluations since, and keeps the best adapter's weights.

    ``patience``: evaluations without progress before the run stops (0: never); progress is the best eval loss
    falling ``threshold`` below where it stood at the last progress (so a slow but steady fall still counts, and
    an easy task whose loss creeps from 1e-4 to 9e-5 stops); ``keep``: hold the best weights (load_best), which
    follow every new best however small. ``history``: the records logged so far (a resumed run's).
    """

    def __init__(self, out: Path, patience: int, keep: bool, history: list[dict], rank: int = 0,
                 threshold: float = 0.0):
        self.dir, self.patience, self.keep, self.rank = out / CHECKPOINTS / BEST, patience, keep, rank
        self.threshold, self.mark = threshold, math.inf  # mark: the best loss at the last progress
        self.best_step, self.best_loss, self.since = 0, math.inf, 0
        for h in history:
            if "eval_loss" in h:
                self._see(h["step"], h["eval_loss"])
        self.weights: dict[str, torch.Tensor] | None = None
        if keep and self.best_step:
            self.weights = self._read()

    def _see(self, step: int, loss: float) -> bool:
        """Count one evaluation; True if it is a new best."""
        if loss < self.mark - self.threshold:  # (the first finite loss is progress: inf - t = inf)
            self.mark, self.since = loss, 0
        else:
            self.since += 1
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            return True
        return False

    @property
    def stopped(self) -> bool:
        """True once ``patience`` evaluations in a row have made no progress."""
        return self.patience > 0 and self.since >= self.patience

    def update(self, step: int, loss: float, lm) -> bool:
        """Record the eval loss of ``step``; keep ``lm``'s adapter if it is the best yet. True: stop now."""
        if self._see(step, loss) and self.keep:
            self.weights = snapshot(lm)
            if self.rank == 0:
                with atomic_dir(self.dir) as tmp:
                    save_tensors({k: v.detach().cpu() for k, v in self.weights.items()}, tmp / "adapter.safetensors")
                    save_json({"step": step, "eval_loss": loss}, tmp / "best.json")
        return self.stopped

    def restore_best(self, lm) -> int | None:
        """Put the best adapter back into ``lm`` (load_best); returns its step, None if there is none to restore."""
        if not self.keep or self.weights is None:
            return None
        restore(lm, self.weights)
        return self.best_step

    def _read(self) -> dict[str, torch.Tensor] | None:
        import json

        meta = self.dir / "best.json"
        try:
            step = json.loads(meta.read_text())["step"]
            if step == self.best_step:
                return read_tensors(self.dir / "adapter.safetensors")
        except (OSError, ValueError, KeyError):
            pass
        warnings.warn(f"train.load_best: the adapter of the best evaluation (step {self.best_step}) was not saved "
                      "before the run was interrupted; the best one from here on is kept", ConfigWarning,
                      stacklevel=3)
        # (the next evaluation becomes the best: its weights are kept)
        self.best_loss, self.mark, self.since = math.inf, math.inf, 0
        return None
