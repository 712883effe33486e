"""Cluster structure of per-layer representations ("Demystifying representation alignment…" = seed 000).

Per layer, each item is one vector (the last position, as in the paper, or the mean). The paper maps
the vectors to 2-D with t-SNE, scores clusters with the silhouette *in that 2-D projection*, and reads Euclidean
distances between chosen items (its Tables 2-3) and between cluster centroids.

Documented choices:
- t-SNE: ``sklearn.manifold.TSNE`` with its defaults (PCA init, learning_rate="auto", 1000 iterations), a fixed
  ``random_state`` and ``perplexity = min(30, (n − 1) / 3)`` (option ``perplexity``; 30 from 91 items on).
  Barnes-Hut t-SNE looks at the 3·perplexity nearest neighbours, so a perplexity near n makes every item a
  neighbour of every other and the map uninformative (on 30 items, perplexity 29 gave a speech/text silhouette
  of 0.0 at layers where the full space gives 0.75); the (n − 1)/3 cap is openTSNE's rule. The map is chaotic in
  its input: a change of 1e-7 (float rounding from another batch size or thread count) can give another layout,
  so t-SNE silhouettes are reproducible to about 0.01, not bit for bit; ``space=full`` scores are.
- Silhouette: ``sklearn.metrics.silhouette_score`` (Euclidean). ``space=tsne`` (default) scores the 2-D t-SNE
  coordinates as the paper does; t-SNE does not preserve distances, so ``space=full`` (the raw activations) or
  ``space=both`` is the safer reading. A label is skipped, with a note, when it has fewer than two classes or
  every class has a single member; a label carried by only some items (e.g. ``voice`` on speech items) is
  scored on those items.
- Distances: Euclidean, in the full space and in the 2-D t-SNE map (``distances=full|tsne|both``, default both):
  the paper measures "the Euclidean distance between any pair of embedded vectors" as a proxy for the full space,
  and its tables' magnitudes (growing with depth) read like full-space distances, so both are given. Activation
  norms grow with depth, so raw distances mostly track the norm; ``normalize=true`` L2-normalises each vector
  before full-space distances and centroids (t-SNE and silhouettes are always computed on the raw vectors).
  Centroid c_g = mean of the vectors of group g; D[g, h] = ||c_g − c_h||.
- Layers are the site indices of the stack (0 = output of the first block).
- Position: ``auto`` (default) reads the last position on a stack that runs per decode step (an LM or text
  decoder, the paper's setting) and the mean over the valid positions on an encoder, whose last position is only
  the end of the clip (on Whisper base its deep states are dominated by a few outlier units, and language
  silhouettes there fall below zero while the mean's stay positive).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.threads import capped
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses import reps

# Labels that say which version of a sentence an item is (used to pick comparable items for distance tables).
from lalm_probe.plugins.analyses.clusters.measure import (
    DEFAULT_LABELS,
    OPTIONAL_LABELS,
    SPACES,
    centroid_distances,
    default_items,
    effective_perplexity,
    pairwise_distances,
    short_names,
    silhouette,
    silhouette_problem,
    tsne_2d,
)
from lalm_probe.plugins.analyses.clusters.plots import scatter, silhouette_plot


# ---- the plugin ------------------------------------------------------------------------------------------
@dataclass
class Clusters(Analysis):
    """t-SNE maps, silhouette per label per layer, item and centroid distance tables."""

    name: ClassVar[str] = "clusters"
    description: ClassVar[str] = "t-SNE, silhouette per label per layer, Euclidean distance tables (seed 000)"

    stack: str | None = None  # default: the lens stack (the LM), else the first stack
    site: str = "out"  # a per-layer component, or a stack-level extra (e.g. adaptor, projector)
    position: str = "auto"  # auto: last on an LM / decoder (the paper), mean on an encoder; or last, mean, …
    labels: list[str] | None = None  # default: language, semantic_id, modality + speaker/gender/condition/voice
    space: str = "tsne"  # silhouette in the 2-D t-SNE map (paper), the full space, or both
    plot_layers: list[int] | None = None  # t-SNE scatters and distance tables; default first / middle / last
    items: list[str] | None = None  # item ids for the distance tables; default: see default_items
    normalize: bool = False  # L2-normalise vectors before full-space distances and centroids
    distances: str = "both"  # item and centroid distance tables in the full space, the t-SNE map, or both
    seed: int = 0  # t-SNE random_state
    perplexity: float = 30.0  # t-SNE perplexity, capped at (n − 1) / 3 for small item sets

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise UserError(f"clusters: space must be one of {', '.join(SPACES)}, got '{self.space}'.")
        if self.distances not in SPACES:
            raise UserError(f"clusters: distances must be full, tsne or both, got '{self.distances}'.")
        if self.perplexity <= 0:
            raise UserError(f"clusters: perplexity must be positive, got {self.perplexity}.")

    def _labels(self, dataset: Dataset) -> list[str]:
        carried = {k for it in dataset for k in it.labels}
        if self.labels:
            missing = [k for k in self.labels if k not in carried]
            if missing:
                raise UserError(f"clusters: no item has the label(s) {missing}; labels in this dataset: "
                                f"{', '.join(sorted(carried)) or 'none'}.")
            return list(self.labels)
        chosen = [k for k in (*DEFAULT_LABELS, *OPTIONAL_LABELS) if k in carried]
        if not chosen:
            known = ", ".join(DEFAULT_LABELS + OPTIONAL_LABELS)
            raise UserError(f"clusters: the items carry none of the labels {known}; name the labels to score "
                            "with labels=[...].")
        return chosen

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        stack = reps.resolve_stack(model, self.stack)
        reps.layer_sites(model, stack, self.site)
        chosen = self._labels(dataset)
        every = [k for k in chosen if all(k in it.labels for it in dataset)]
        return Requirements(sites=[reps.site_pattern(model, stack, self.site)],
                            positions=[reps.resolve_position(model, stack, self.position)], labels=every)

    @capped
    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        stack = reps.resolve_stack(model, self.stack)
        sites = reps.layer_sites(model, stack, self.site)
        labels = self._labels(dataset)
        spaces = ["tsne", "full"] if self.space == "both" else [self.space]
        shown = reps.spread_layers([layer for layer, _ in sites], self.plot_layers)
        position = reps.resolve_position(model, stack, self.position)
        result = Result(summary={"stack": stack, "site": self.site, "position": position,
                                 "silhouette space": self.space, "distances normalised": self.normalize})
        if self.position == "auto" and position == "mean":
            result.notes.append(reps.auto_position_note(stack, position))
        for run, store in stores.activations():
            items = reps.items_reaching(dataset, store, stack, f"{sites[0][1]}@{position}",
                                        result.notes if run == "baseline" else None)
            if len(items) < 3:
                raise UserError(f"clusters needs at least 3 items; the store holds {len(items)} with '{stack}' "
                                f"sites.")
            ids = [it.id for it in items]
            if run == "baseline":
                result.summary["t-SNE perplexity"] = effective_perplexity(len(ids), self.perplexity)
            scored = self._scored_labels(items, labels, result, note=run == "baseline")
            table_ids = self._table_items(items)
            by_id = {it.id: it for it in items}
            rows, curves, coords = [], {(k, s): [] for k in scored for s in spaces}, {}
            dist_spaces = ["full", "tsne"] if self.distances == "both" else [self.distances]
            dist_rows: dict[str, list] = {sp: [] for sp in dist_spaces}
            cent_rows: dict[str, list] = {sp: [] for sp in dist_spaces}
            for layer, site in sites:
                x = reps.load_layer(store, site, position, ids)
                row: dict[str, Any] = {"run": run, "layer": layer, "mean_norm": float(np.linalg.norm(x, axis=1).mean())}
                emb = tsne_2d(x, self.seed, self.perplexity) if ("tsne" in spaces or layer in shown) else None
                if emb is not None:
                    coords[layer] = emb
                    result.arrays[f"{run}/tsne/{layer}"] = emb
                for key, (mask, values) in scored.items():
                    for space in spaces:
                        data = (emb if space == "tsne" else x)[mask]
                        score = silhouette(data, values)
                        curves[(key, space)].append(score)
                        row[f"{key} ({space})" if len(spaces) > 1 else key] = score
                rows.append(row)
                for space in dist_spaces:
                    data, norm, tag = (x, self.normalize, "") if space == "full" else (emb, False, "tsne_")
                    if data is None:
                        continue
                    for key, (mask, values) in scored.items():
                        names, dist = centroid_distances(data[mask], values, norm)
                        result.arrays[f"{run}/{tag}centroid_distance/{key}/{layer}"] = dist
                        if layer in shown:
                            cent_rows[space] += [{"run": run, "layer": layer, "label": key, "group_a": names[i],
                                                  "group_b": names[j], "distance": dist[i, j]}
                                                 for i in range(len(names)) for j in range(i + 1, len(names))]
                    if layer in shown and table_ids:
                        pos = [ids.index(i) for i in table_ids]
                        d = pairwise_distances(data[pos], norm)
                        result.arrays[f"{run}/{tag}item_distance/{layer}"] = d
                        names = short_names([by_id[i] for i in table_ids])
                        dist_rows[space] += [{"run": run, "layer": layer, "name": names[r], "item": a,
                                              **{b: d[r, c] for c, b in enumerate(names)}}
                                             for r, a in enumerate(table_ids)]
            result.arrays[f"{run}/ids"] = np.array(ids)
            layer_names = [layer for layer, _ in sites]
            for (key, space), values in curves.items():
                result.arrays[f"{run}/silhouette/{key}/{space}"] = np.array(values)
                if run == "baseline" and np.isfinite(values).any():
                    best = int(np.nanargmax(values))
                    result.summary[f"{key}: best layer ({space})"] = layer_names[best]
                    result.summary[f"{key}: max silhouette ({space})"] = values[best]
            result.tables.append(Table(f"Silhouette per layer, space={self.space} ({run})", rows))
            for space in dist_spaces:
                where = "in the full space" + (", L2-normalised" if self.normalize else "") if space == "full" \
                    else "in the t-SNE map"
                if dist_rows[space]:
                    result.tables.append(Table(f"Euclidean distances between items {where} ({run})",
                                               dist_rows[space]))
                result.tables.append(Table(f"Distances between cluster centroids {where} ({run})", cent_rows[space],
                                           show=False))
            result.figures[f"silhouette_{run}"] = silhouette_plot(curves, layer_names, f"{stack} ({run})")
            for key, (mask, values) in scored.items():
                result.figures[f"tsne_{key}_{run}"] = scatter(coords, shown, mask, values, items, key, run)
        if "tsne" in spaces:
            result.notes.append("Silhouette in the t-SNE map follows the paper; t-SNE does not preserve distances "
                                "and turns float rounding (e.g. another --batch-size) into another layout, so its "
                                "silhouettes agree to about 0.01 between such runs. space=full (raw activations) "
                                "is exact.")
        return result

    def _scored_labels(self, items: list[Stimulus], labels: list[str], result: Result, note: bool
                       ) -> dict[str, tuple[np.ndarray, list[str]]]:
        """Per label: which items carry it and their values; labels without a defined silhouette are noted."""
        out = {}
        for key in labels:
            mask = np.array([key in it.labels for it in items])
            values = [str(it.labels[key]) for it in items if key in it.labels]
            problem = silhouette_problem(values) if values else "no item carries it"
            if problem == "fewer than two classes":
                problem += f" (every item is '{values[0]}')"
            if problem is None and mask.sum() < 3:
                problem = "fewer than 3 items carry it"
            if problem:
                if note:
                    result.notes.append(f"Label '{key}' skipped: {problem}.")
                continue
            if note and not mask.all():
                result.notes.append(f"Label '{key}' is scored on the {int(mask.sum())} of {len(items)} items "
                                    "that carry it.")
            out[key] = (mask, values)
        if not out:
            raise UserError(f"clusters: none of the labels {labels} has two or more classes with a repeated member, "
                            "so no silhouette can be computed.")
        return out

    def _table_items(self, items: list[Stimulus]) -> list[str]:
        if self.items is None:
            return default_items(items)
        held = {it.id for it in items}
        missing = [i for i in self.items if i not in held]
        if missing:
            raise UserError(f"clusters: items {missing[:3]} are not in the dataset (or were not collected).")
        return list(self.items)



@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Clusters]
