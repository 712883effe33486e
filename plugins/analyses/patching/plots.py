"""Figures of the patching analysis: the layer x position effect map, one panel per component."""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.results import pyplot


def effect_map(maps: dict[str, np.ndarray], layers: list[int], positions: list[str], title: str,
               value: str = "normalised effect") -> Any:
    """``maps``: component -> (layers, positions) mean effect; NaN cells (nothing to compare) stay blank."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(1.6 + 1.1 * len(positions) * len(maps), 1.4 + 0.32 * len(layers)),
                             squeeze=False)
    for ax, (component, grid) in zip(axes[0], maps.items()):
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(positions)), positions, fontsize=7, rotation=30)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set(title=component, xlabel="position", ylabel="layer (site index)")
    fig.colorbar(im, ax=axes[0].tolist(), label=value)
    fig.suptitle(title, fontsize=9)
    return fig
