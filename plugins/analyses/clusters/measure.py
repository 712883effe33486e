"""The math of the clusters analysis: pure functions on arrays, tested against reference implementations."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses import reps
from scipy.spatial.distance import cdist
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

# Labels that say which version of a sentence an item is (used to pick comparable items for distance tables).


DEFAULT_LABELS = ("language", "semantic_id", "modality")
OPTIONAL_LABELS = ("speaker", "gender", "condition", "voice")
SPACES = ("tsne", "full", "both")
VERSION_LABELS = ("language", "voice", "speaker", "gender", "condition", "mic", "structure", "rate", "pitch")

# ---- the math --------------------------------------------------------------------------------------------
def effective_perplexity(n: int, perplexity: float = 30.0) -> float:
    """``min(perplexity, (n − 1) / 3)``, at least 1: every item keeps non-neighbours, so small sets still embed."""
    return float(max(1.0, min(perplexity, (n - 1) / 3)))


def tsne_2d(x: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE with a fixed seed and the perplexity capped by :func:`effective_perplexity`."""
    n = len(x)
    if n < 3:
        raise UserError(f"t-SNE needs at least 3 items; got {n}.")
    return TSNE(n_components=2, perplexity=effective_perplexity(n, perplexity), init="pca", learning_rate="auto",
                random_state=seed).fit_transform(np.asarray(x, dtype=np.float64))


def silhouette_problem(labels: Sequence[Any]) -> str | None:
    """Why a silhouette score is undefined for these labels, or None when it is defined."""
    _, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    if len(counts) < 2:
        return "fewer than two classes"
    if counts.max() < 2:
        return "every class has a single member"
    return None


def silhouette(x: np.ndarray, labels: Sequence[Any]) -> float:
    """Mean silhouette (Euclidean) of ``labels`` on ``x``; NaN where it is undefined."""
    if silhouette_problem(labels):
        return float("nan")
    return float(silhouette_score(x, np.asarray(labels, dtype=str), metric="euclidean"))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), to take norm growth out of distances."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def pairwise_distances(x: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Euclidean distances between all rows (the paper's item tables)."""
    x = l2_normalize(x) if normalize else np.asarray(x, dtype=np.float64)
    return cdist(x, x)


def centroid_distances(x: np.ndarray, groups: Sequence[Any], normalize: bool = False
                       ) -> tuple[list[str], np.ndarray]:
    """Group names (sorted) and D[g, h] = ||c_g − c_h|| with c_g the mean vector of group g."""
    x = l2_normalize(x) if normalize else np.asarray(x, dtype=np.float64)
    g = np.asarray(groups, dtype=str)
    names = sorted(set(g.tolist()))
    cents = np.stack([x[g == name].mean(axis=0) for name in names])
    return names, cdist(cents, cents)


def default_items(items: Sequence[Stimulus], limit: int = 6) -> list[str]:
    """Items for the distance table: up to 3 versions of the first sentence that has several (other languages,
    modalities, voices…), plus the same versions of the next sentence — the paper's A1 A2 / B1 B2 layout."""
    by_sid: dict[str, list[Stimulus]] = {}
    for it in items:
        if "semantic_id" in it.labels:
            by_sid.setdefault(str(it.labels["semantic_id"]), []).append(it)
    sids = list(by_sid)
    first = next((s for s in sids if len(by_sid[s]) > 1), None)
    if first is None:
        return [it.id for it in items[:limit]]
    chosen = by_sid[first][: limit // 2]
    out = [it.id for it in chosen]
    other = next((s for s in sids if s != first), None)
    if other is not None:
        def key(it: Stimulus) -> tuple:
            return (reps.modality_of(it), *(str(it.labels.get(k)) for k in VERSION_LABELS))

        for it in chosen:
            match = next((c for c in by_sid[other] if key(c) == key(it) and c.id not in out), None)
            match = match or next((c for c in by_sid[other] if reps.modality_of(c) == reps.modality_of(it)
                                   and c.id not in out), None)
            if match is not None:
                out.append(match.id)
    return out[:limit]


def short_names(items: Sequence[Stimulus]) -> list[str]:
    """Column names for the item distance table: a letter per sentence (``semantic_id``, in order of
    appearance) and a number per version, as the paper's A1 A2 / B1 B2; the ids when that does not apply."""
    sids = [it.labels.get("semantic_id") for it in items]
    letters = list(dict.fromkeys(sids))
    if None in letters or len(letters) > 26:
        return [it.id for it in items]
    seen: dict[Any, int] = {}
    out = []
    for sid in sids:
        seen[sid] = seen.get(sid, 0) + 1
        out.append(f"{chr(65 + letters.index(sid))}{seen[sid]}")
    return out


