"""Plots for the logit lens: information score curves and layer x position heat maps of the top token."""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.results import pyplot


def score_plot(curves: dict[str, np.ndarray], n_labels: int, alpha: float, title: str) -> Any:
    """Information score per layer for all / correct / incorrect items, with chance and the threshold."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
    colors = {"all": "black", "correct": "tab:green", "incorrect": "tab:red"}
    for name, scores in curves.items():
        if np.all(np.isnan(scores)):
            continue
        ax.plot(np.arange(len(scores)), scores, marker="o", ms=3, label=name, color=colors.get(name))
    ax.axhline(1 / n_labels, ls=":", color="grey", label="chance 1/|Y|")
    ax.axhline((1 + alpha) / n_labels, ls="--", color="grey", label=f"threshold (1+{alpha})/|Y|")
    ax.set(xlabel="layer (site index, from 0)", ylabel="information score", title=title, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    return fig


def heatmap(probs: np.ndarray, tokens: list[list[str]], length: int, title: str) -> Any:
    """Top-1 lens probability per layer (rows) and position (columns), each cell labelled with its token.

    ``probs`` covers the last ``probs.shape[1]`` of ``length`` positions; tokens are decoded text, shown
    with escapes for whitespace so a newline or a space stays visible.
    """
    n_layers, n_pos = probs.shape
    fig, ax = pyplot().subplots(figsize=(1.2 + 0.75 * n_pos, 1.2 + 0.38 * n_layers))
    im = ax.imshow(probs, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
    for layer in range(n_layers):
        for pos in range(n_pos):
            text = tokens[layer][pos].replace("\n", "\\n").replace(" ", "·")[:8]
            ax.text(pos, layer, text, ha="center", va="center", fontsize=6,
                    color="white" if probs[layer, pos] < 0.6 else "black")
    start = length - n_pos
    ax.set_xticks(range(n_pos), [str(start + i) for i in range(n_pos)], fontsize=7)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set(xlabel=f"position (the last {n_pos} of {length})", ylabel="layer (site index)", title=title)
    fig.colorbar(im, ax=ax, label="top-1 probability")
    return fig
