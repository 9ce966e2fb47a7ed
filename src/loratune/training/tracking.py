"""Where a run's numbers go: ``metrics.jsonl`` (always), a progress bar or plain log lines, and the trackers named
in ``train.report_to`` (TensorBoard, Weights & Biases offline, MLflow with a local file store).

``RunLog`` is the loop's only logger: it is given one record per step (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s`` and, at evaluation steps, ``eval_loss``) and the final metrics, and it sends each where it belongs.
Only rank 0 writes anything. A tracker that is asked for but not installed stops the run before training starts,
with the pip command that installs it; none of them opens a network connection (W&B runs offline, MLflow writes
files under the run's directory).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import settings
from ..errors import ConfigError
from ..fsutil import write_text

SCALARS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def log_interval(steps: int) -> int:
    """Steps between two plain log lines (``--no-progress``): about twenty lines a run, at least every step."""
    return max(1, steps // 20)


class RunLog:
    """The per-step records of a run from ``start`` to ``steps``: jsonl, progress, trackers (rank 0 only).

    ``history`` holds the records logged before ``start`` (a resumed run); the jsonl is rewritten to hold exactly
    them, dropping lines a killed run logged after its last checkpoint.
    """

    def __init__(self, out: Path, history: list[dict], start: int, steps: int, progress: bool, rank: int = 0,
                 report_to: list[str] | None = None, run_name: str | None = None, config: dict | None = None):
        self.path = out / "metrics.jsonl"
        self.history = history
        self.start, self.steps, self.rank = start, steps, rank
        self.progress = progress
        self.every = log_interval(steps)
        self.last_eval = ""  # the latest evaluation, kept in the bar's postfix
        self.t0 = time.time()
        self.trackers: list[_Tracker] = []
        if rank != 0:
            self.bar = None
            return
        write_text(self.path, "".join(json.dumps(h) + "\n" for h in history))
        self.trackers = [_open(name, out, run_name or out.name, config or {}) for name in report_to or []]
        self.bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True) if progress else None

    def step(self, record: dict) -> None:
        """Log one step's record everywhere it goes."""
        self.history.append(record)
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for t in self.trackers:
            t.scalars({f"train/{k}": v for k, v in record.items() if k in SCALARS}, record["step"])
        step = record["step"]
        if "eval_loss" in record:
            self.last_eval = f"{record['eval_loss']:.4f} (step {step})"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}",
                                 **({"eval_loss": self.last_eval} if self.last_eval else {}))
            self.bar.update(1)
        elif step % self.every == 0 or step == self.steps or "eval_loss" in record:  # (every evaluation is shown)
            print(self.line(record), flush=True)

    def line(self, record: dict) -> str:
        """``step 40/200  loss 1.2345  lr 2.00e-04  1234 tok/s  eta 3m10s`` (and the eval loss where there is one)."""
        step = record["step"]
        done = step - self.start
        eta = (time.time() - self.t0) / done * (self.steps - step) if done > 0 else float("nan")
        text = (f"step {step}/{self.steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"{record['tokens_per_s']:.0f} tok/s  eta {_duration(eta)}")
        if "eval_loss" in record:
            text += f"  eval_loss {record['eval_loss']:.4f}"
        return text

    def final(self, metrics: dict[str, Any]) -> None:
        """The run's final numbers (e.g. held-out exact match), sent to the trackers as ``final/...``."""
        numbers = {f"final/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for t in self.trackers:
            t.scalars(numbers, self.history[-1]["step"] if self.history else 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for t in self.trackers:
            t.close()
        self.trackers = []


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def check_trackers(names: list[str] | None) -> None:
    """A one-line ConfigError naming the pip command for each tracker in ``names`` that is not installed."""
    import importlib.util

    missing = [n for n in names or [] if importlib.util.find_spec(n) is None
               or (n == "tensorboard" and importlib.util.find_spec("tensorboard.summary") is None)]
    if missing:
        raise ConfigError(f"train.report_to names {', '.join(missing)}, which is not installed here; pip install "
                          f"{' '.join(_PACKAGES[n] for n in missing)}, or drop it from train.report_to")


class _Tracker:
    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TensorBoard(_Tracker):
    """Event files under ``OUT/tensorboard`` (``tensorboard --logdir OUT/tensorboard``)."""

    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("run_config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def scalars(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _Wandb(_Tracker):
    """A Weights & Biases run in offline mode under ``OUT/wandb`` (``wandb sync`` uploads it later)."""

    def __init__(self, out: Path, name: str, config: dict):
        import wandb

        settings.library_default("WANDB_SILENT", "true")
        self.run = wandb.init(project="loratune", name=name, dir=str(out), mode="offline", config=config,
                              reinit="create_new")

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class _Mlflow(_Tracker):
    """An MLflow run in a local file store, ``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``)."""

    def __init__(self, out: Path, name: str, config: dict):
        from mlflow.tracking import MlflowClient

        # MLflow 3 keeps its file store in "maintenance mode" behind this switch; a local directory (no server, no
        # database driver) is what issue 22's users asked for, and `mlflow ui` still reads it.
        settings.library_default("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name("loratune")
        eid = experiment.experiment_id if experiment else self.client.create_experiment("loratune")
        self.run_id = self.client.create_run(eid, run_name=name).info.run_id
        for k, v in _flat(config).items():
            self.client.log_param(self.run_id, k, str(v)[:500])

    def scalars(self, values, step):
        for k, v in values.items():
            self.client.log_metric(self.run_id, k.replace("/", "."), v, step=step)

    def close(self):
        self.client.set_terminated(self.run_id)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _open(name: str, out: Path, run_name: str, config: dict) -> _Tracker:
    if name == "tensorboard":
        return _TensorBoard(out, config)
    if name == "wandb":
        return _Wandb(out, run_name, config)
    return _Mlflow(out, run_name, config)
