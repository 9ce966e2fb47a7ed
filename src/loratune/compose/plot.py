"""The picture of an ``Analysis``: each module's normalised singular values, and a layer × module-type heat map of
the rank that holds 90 % of ΔW's energy. Written atomically as a PNG."""

from __future__ import annotations

from pathlib import Path

from ..fsutil import atomic_write
from .rank import Analysis


def plot_analysis(analysis: Analysis, path: str | Path, title: str = "") -> None:
    """Write the spectra and the heat map of ``analysis`` to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({m.type for m in analysis.modules})
    layers = sorted({m.layer for m in analysis.modules if m.layer is not None})
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(types)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.2, 1]})
    seen = set()
    for m in analysis.modules:
        s = [x for x in m.singular_values if x > 0]
        if not s:
            continue
        ax1.semilogy(range(1, len(s) + 1), [x / s[0] for x in s], color=colors[m.type], alpha=0.5, lw=1,
                     label=m.type if m.type not in seen else None)
        seen.add(m.type)
    ax1.set_xlabel("index i")
    ax1.set_ylabel("σᵢ / σ₁")
    ax1.set_title("singular values of ΔW, per module")
    ax1.legend(fontsize=8)
    if layers:
        grid = [[float("nan")] * len(types) for _ in layers]
        for m in analysis.modules:
            if m.layer is not None:
                grid[layers.index(m.layer)][types.index(m.type)] = m.rank_90
        im = ax2.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
        ax2.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax2.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax2.set_ylabel("layer")
        fig.colorbar(im, ax=ax2, label="rank holding 90 % of energy")
        ax2.set_title("90 % energy rank per layer and module")
    else:
        ax2.axis("off")
    fig.suptitle(title or f"recommended r = {analysis.recommended_r}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
