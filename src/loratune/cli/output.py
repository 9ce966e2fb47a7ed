"""What the commands print (the eval table, the end-of-run summary, JSON without NaN), and what kind of adapter a
directory holds: shared by the causal-LM commands (infer.py) and the classification ones (classify.py)."""

from __future__ import annotations

import math
from pathlib import Path

from ..adapters.files import read_adapter_config


def print_table(rows: dict[str, dict]) -> None:
    cols = ["loss", "perplexity", "exact_match", "n"]
    print(f"{'':10s}" + "".join(f"{c:>14s}" for c in cols))
    for label, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-':>14s}" if v is None else f"{v:>14.1%}" if c == "exact_match"
                         else f"{v:>14d}" if isinstance(v, int) else f"{v:>14.4f}")
        print(f"{label:10s}" + "".join(cells))


def print_summary(history: list[dict], seconds: float, adapter_dir: Path) -> None:
    """The end-of-run table: train and eval loss at the start, the end and their best."""
    if not history:
        return
    ev = [h["eval_loss"] for h in history if "eval_loss" in h]
    tr = [h["loss"] for h in history]
    print(f"\n{'':12s}{'first':>10s}{'last':>10s}{'best':>10s}")
    print(f"{'train loss':12s}{tr[0]:>10.4f}{tr[-1]:>10.4f}{min(tr):>10.4f}")
    if ev:
        print(f"{'eval loss':12s}{ev[0]:>10.4f}{ev[-1]:>10.4f}{min(ev):>10.4f}")
    print(f"steps {history[-1]['step']} · {seconds:.0f} s · {history[-1]['tokens_per_s']:.0f} tokens/s · "
          f"adapter {adapter_dir}")


def is_classifier(adapter: str) -> bool:
    """Whether the adapter in ``adapter`` was trained for sequence classification (PEFT's task_type SEQ_CLS)."""
    return read_adapter_config(adapter).task_type == "SEQ_CLS"


def finite_or_none(rows: dict) -> dict:
    """``rows`` with every NaN or infinite number replaced by None: JSON has no NaN."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return clean(rows)
