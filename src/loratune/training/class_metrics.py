"""A classifier's scores on labelled rows: accuracy, macro-F1 and the confusion matrix (as a table and a PNG)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..fsutil import atomic_write


def confusion_matrix(true: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """k × k counts: row = the true class, column = the predicted one (scikit-learn's layout)."""
    return torch.bincount(true.long() * k + pred.long(), minlength=k * k).reshape(k, k)


def scores(true: torch.Tensor, pred: torch.Tensor, k: int) -> dict:
    """``accuracy``, ``macro_f1`` and ``confusion`` (a list of rows) of predictions ``pred`` against ``true``.

    Macro-F1 averages the per-class F1 over the classes that occur in ``true`` or ``pred`` (scikit-learn's
    ``f1_score(average="macro")``): a label with no rows and no predictions does not count."""
    cm = confusion_matrix(true, pred, k).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = 2 * tp / (support + predicted).clamp(min=1)
    n = int(cm.sum())
    return {"accuracy": float(tp.sum() / n) if n else float("nan"),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "confusion": cm.long().tolist()}


def confusion_table(confusion: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix as text: one row per true label, one column per predicted label."""
    names = [str(v) for v in labels]
    width = max(9, *(len(s) for s in names), *(len(str(c)) for row in confusion for c in row)) + 1
    corner = "true/pred"[:width - 1]
    lines = [f"{corner:>{width}s}" + "".join(f"{s[:width - 1]:>{width}s}" for s in names)]
    for name, row in zip(names, confusion):
        lines.append(f"{name[:width - 1]:>{width}s}" + "".join(f"{c:>{width}d}" for c in row))
    return "\n".join(lines)


def write_confusion_png(confusions: dict[str, list[list[int]]], labels: list[str], path: Path) -> None:
    """One heat map per model (e.g. base and adapter) side by side, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    size = max(3.0, 0.5 * k + 1.5)
    fig, axes = plt.subplots(1, len(confusions), figsize=(size * len(confusions), size), squeeze=False)
    for ax, (title, cm) in zip(axes[0], confusions.items()):
        m = torch.tensor(cm, dtype=torch.float64)
        ax.imshow(m.numpy(), cmap="Blues", vmin=0)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i][j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
        ax.set_xticks(range(k), [str(v) for v in labels], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), [str(v) for v in labels], fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))  # whole or not at all
    finally:
        plt.close(fig)
