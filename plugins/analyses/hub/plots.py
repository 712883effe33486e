"""Figures of the hub analysis."""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.results import pyplot


# ---- figures ---------------------------------------------------------------------------------------------
def similarity_plot(curves: dict[str, np.ndarray], layers: list, run: str) -> Any:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = np.arange(len(layers))
    for n, (name, c) in enumerate(curves.items()):
        color = plt.cm.tab10(n % 10) if len(curves) <= 10 else plt.cm.tab20(n % 20)
        ax.plot(x, c[:, 0], marker="o", ms=3, color=color, label=name)
        ax.fill_between(x, c[:, 1], c[:, 2], color=color, alpha=0.15)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [str(layer) for layer in layers], fontsize=7)
    ax.set(title=f"Matched minus non-matched cosine (Eq. 1), 95% CI ({run})", xlabel="layer",
           ylabel="baseline-adjusted cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
    fig.tight_layout()
    return fig


def lens_plot(curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]], layers: list, dominant: str,
               run: str) -> Any:
    plt = pyplot()

    mods = sorted({m for m, _ in curves})
    fig, axes = plt.subplots(1, len(mods), figsize=(6.5 * len(mods), 4), squeeze=False)
    x = np.arange(len(layers))
    for ax, mod in zip(axes[0], mods):
        langs = sorted(lang for m, lang in curves if m == mod)
        for n, lang in enumerate(langs):
            p_in, p_dom = curves[(mod, lang)]
            color = plt.cm.tab10(n % 10) if len(langs) <= 10 else plt.cm.tab20(n % 20)
            ax.plot(x, p_in, color=color, label=f"{lang}: p({lang}|h)")
            if lang != dominant and np.isfinite(p_dom).any():
                ax.plot(x, p_dom, color=color, ls="--", label=f"{lang}: p({dominant}|h)")
        ax.set_xticks(x, [str(layer) for layer in layers], fontsize=7)
        ax.set(title=f"{mod} input: lens language probability ({run})", xlabel="layer", ylabel="p(language | h)",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(langs) > 4 else 1)
    fig.tight_layout()
    return fig


