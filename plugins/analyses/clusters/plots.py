"""Figures of the clusters analysis."""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.data import Stimulus
from lalm_probe.core.results import pyplot

# Labels that say which version of a sentence an item is (used to pick comparable items for distance tables).
from lalm_probe.plugins.analyses import reps


# ---- figures ---------------------------------------------------------------------------------------------
def silhouette_plot(curves: dict[tuple[str, str], list[float]], layers: list[Any], title: str) -> Any:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = list(dict.fromkeys(k for k, _ in curves))
    x = np.arange(len(layers))
    for (key, space), values in curves.items():
        ax.plot(x, values, marker="o", ms=3, color=plt.cm.tab10(keys.index(key) % 10),
                ls="-" if space == "tsne" else "--", label=f"{key} ({'t-SNE 2-D' if space == 'tsne' else 'full'})")
    ax.set_xticks(x, [str(layer) for layer in layers], fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title=f"Silhouette per layer — {title}", xlabel="layer", ylabel="silhouette score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def scatter(coords: dict[Any, np.ndarray], layers: list[Any], mask: np.ndarray, values: list[str],
             items: list[Stimulus], key: str, run: str) -> Any:
    plt = pyplot()

    classes = sorted(set(values))
    cmap = plt.cm.tab10 if len(classes) <= 10 else plt.cm.tab20
    mods = np.array([reps.modality_of(it) for it, m in zip(items, mask) if m])
    markers = {"speech": "o", "text": "^"}
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers) + 1.5, 4), squeeze=False)
    v = np.array(values)
    for ax, layer in zip(axes[0], layers):
        xy = coords[layer][mask]
        for c, cls in enumerate(classes):
            first = True
            for mod in sorted(set(mods)):
                sel = (v == cls) & (mods == mod)
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(c % cmap.N), marker=markers.get(mod, "s"),
                               label=cls if first else None)
                    first = False
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        handles, names = axes[0][-1].get_legend_handles_labels()
        uniq = dict(zip(names, handles))
        fig.legend(uniq.values(), uniq.keys(), loc="center right", fontsize=7, title=key)
    shape = " (o speech, ^ text)" if len(set(mods)) > 1 else ""
    fig.suptitle(f"t-SNE coloured by {key}{shape} ({run})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88 if len(classes) <= 20 else 1, 1))
    return fig


