"""Figures of the neurons analysis: where selected units sit, and language x language matrices."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from lalm_probe.core.results import pyplot


def placement(grid: np.ndarray, components: Sequence[str], title: str) -> Any:
    """Selected units per layer (rows, site index from 0) and component (columns), as counts."""
    fig, ax = pyplot().subplots(figsize=(1.5 + 0.55 * len(components), 1.2 + 0.32 * grid.shape[0]))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma")
    ax.set_xticks(range(len(components)), list(components), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])], fontsize=7)
    ax.set(xlabel="component", ylabel="layer (site index)", title=title)
    fig.colorbar(im, ax=ax, label="selected units")
    return fig


def heatmap(matrix: np.ndarray, languages: Sequence[str], title: str, fmt: str = ".0f") -> Any:
    """A language x language matrix (rows: text, columns: speech) with its values written in."""
    fig, ax = pyplot().subplots(figsize=(1.5 + 0.6 * len(languages), 1.2 + 0.5 * len(languages)))
    im = ax.imshow(matrix, cmap="viridis")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, format(matrix[i, j], fmt), ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(languages)), list(languages))
    ax.set_yticks(range(len(languages)), list(languages))
    ax.set(xlabel="speech", ylabel="text", title=title)
    fig.colorbar(im, ax=ax)
    return fig
