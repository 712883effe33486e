"""Figures of seed 004's lens tests: per-layer curves with 95% intervals."""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.results import pyplot


def curves(series: dict[str, np.ndarray], title: str, ylabel: str, hline: float | None = None,
           hlabel: str = "") -> Any:
    """``series``: name -> (layers, 3) mean, low, high."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (name, c) in enumerate(series.items()):
        x = np.arange(len(c))
        ax.plot(x, c[:, 0], marker="o", ms=3, color=plt.cm.tab10(n % 10), label=name)
        ax.fill_between(x, c[:, 1], c[:, 2], color=plt.cm.tab10(n % 10), alpha=0.15)
    if hline is not None:
        ax.axhline(hline, ls=":", color="grey", label=hlabel)
    ax.set(title=title, xlabel="layer (site index, from 0)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
