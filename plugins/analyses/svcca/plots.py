"""Figures of the svcca analysis."""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.results import pyplot


# ---- figures ---------------------------------------------------------------------------------------------
def curve_plot(curves: dict[str, np.ndarray], points: list, title: str, xlabel: str,
               baselines: tuple[str, ...] = ("random",)) -> Any:
    """SVCCA per point (layers, and ``in`` / ``out`` points) with each baseline asked for: ``curves`` hold
    ``(points, [svcca, random_baseline, shuffled_baseline])``."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(points))
    for n, (name, arr) in enumerate(curves.items()):
        color = plt.cm.tab10(n % 10)
        ax.plot(x, arr[:, 0], marker="o", ms=3, color=color, label=f"{name}")
        for col, kind, ls in ((1, "random", "--"), (2, "shuffled", ":")):
            if kind in baselines and np.isfinite(arr[:, col]).any():
                ax.plot(x, arr[:, col], ls=ls, color=color, alpha=0.7, label=f"{name} ({kind} baseline)")
    ax.set_xticks(x, [str(p) for p in points], fontsize=7)
    ax.set(title=title, xlabel=xlabel, ylabel="SVCCA similarity", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 4 else 1)
    fig.tight_layout()
    return fig


def heatmaps(sim: np.ndarray, langs: list[str], layers: list[int], what: str, names: list[str] | None = None
             ) -> Any:
    """Language x language SVCCA at the points ``layers`` (indices into ``sim``), titled by ``names``."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers) + 0.8, 3.4), squeeze=False)
    for n, (ax, layer) in enumerate(zip(axes[0], layers)):
        im = ax.imshow(sim[layer], vmin=0, vmax=1, cmap="viridis")
        short = max(len(lang) for lang in langs) <= 3
        ax.set_xticks(range(len(langs)), langs, rotation=0 if short else 90, fontsize=8)
        ax.set_yticks(range(len(langs)), langs, fontsize=8)
        if len(langs) <= 8:  # few languages: print the values, colours alone are hard to read off
            for (i, j), v in np.ndenumerate(sim[layer]):
                if np.isfinite(v) and i != j:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
        ax.set_title(f"layer {names[n] if names else layer}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="SVCCA")
    fig.suptitle(what, fontsize=10)
    return fig


