"""Plots for the logit lens: information score curves and single-input layer x position heat maps."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MAX_POSITIONS = 16  # heat maps show the last positions of the prompt, where the answer is formed


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_plot(curves: dict[str, np.ndarray], n_labels: int, alpha: float, title: str) -> Any:
    """Information score per layer for all / correct / incorrect items, with chance and the threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"all": "black", "correct": "tab:green", "incorrect": "tab:red"}
    for name, scores in curves.items():
        if np.all(np.isnan(scores)):
            continue
        ax.plot(np.arange(len(scores)), scores, marker="o", ms=3, label=name, color=colors.get(name))
    ax.axhline(1 / n_labels, ls=":", color="grey", label="chance 1/|Y|")
    ax.axhline((1 + alpha) / n_labels, ls="--", color="grey", label=f"threshold (1+{alpha})/|Y|")
    ax.set(xlabel="layer (site index)", ylabel="information score", title=title, ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    return fig


def heatmaps(lens: Any, session: Any, dataset: Any) -> dict[str, Any]:
    """For the first items: top-1 lens probability per layer and position, annotated with the top token."""
    plt = _pyplot()
    stack = lens._stack(session)
    tok = session.plugin.tokenizer
    figures = {}
    for item in list(dataset)[: lens.heatmap_items]:
        values = session.run([item], [f"{stack}.*.out"], ["all"], prompt_fn=lambda it: lens.prompt(session, it))
        n_layers = session.plugin.resolved[stack].num_layers
        states = [values[f"{stack}.{layer}.out@all"][0][-MAX_POSITIONS:] for layer in range(n_layers)]
        probs, tokens = [], []
        for h in states:
            p = torch.softmax(session.lens(h, stack, lens.norm), -1)
            best = p.max(-1)
            probs.append(best.values.cpu().numpy())
            tokens.append(tok.convert_ids_to_tokens(best.indices.cpu().tolist()))
        grid = np.stack(probs)
        fig, ax = plt.subplots(figsize=(1 + 0.7 * grid.shape[1], 1 + 0.35 * n_layers))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        for layer in range(n_layers):
            for pos in range(grid.shape[1]):
                ax.text(pos, layer, str(tokens[layer][pos])[:8], ha="center", va="center", fontsize=6,
                        color="white" if grid[layer, pos] < 0.6 else "black")
        offset = len(values[f"{stack}.0.out@all"][0]) - grid.shape[1]
        ax.set_xticks(range(grid.shape[1]), [str(offset + i) for i in range(grid.shape[1])], fontsize=7)
        ax.set(xlabel="position (last tokens of the prompt)", ylabel="layer",
               title=f"Logit lens top-1 probability: {item.id}")
        fig.colorbar(im, ax=ax, label="top-1 probability")
        figures[f"heatmap_{_safe(item.id)}"] = fig
    return figures


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]
