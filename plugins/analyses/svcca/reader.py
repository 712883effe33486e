"""Reading the points an SVCCA compares, once each, and scoring a pair of them with its baselines."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from lalm_probe.plugins.analyses import reps
from lalm_probe.plugins.analyses.svcca.measure import random_vectors_baseline, svcca_reduced, svd_reduce, whiten

Point = Any  # a layer index, or a label of a point outside the layers ("in", "out")


class Score(NamedTuple):
    similarity: float
    random: float  # SVCCA of random vectors of the same sizes (NaN when not asked for)
    shuffled: float  # SVCCA of the same vectors with one side's pairing shuffled (NaN when not asked for)
    kx: int
    ky: int


class Reader:
    """Reads each site once for every stored item and caches each side's SVD-reduced, whitened form.

    ``sites``: per modality, point -> site (``speech_encoder.3.out``, ``speech_encoder.features``). ``clear`` is
    called when a loop moves to the next layer, so memory holds one or two layers at a time. The random-vectors
    baseline depends only on the sizes (items, widths), so it is computed once per size.
    """

    def __init__(self, store: Any, ids: list[str], sites: dict[str, dict[Point, str]], position: str,
                 variance: float, epsilon: float, baselines: set[str], random_draws: int, permutations: int,
                 seed: int) -> None:
        self.store, self.sites, self.position = store, sites, position
        self.ids: dict[str, list[str]] = {}  # per site: the items whose rows hold it, in dataset order
        for site in {s for per in sites.values() for s in per.values()}:
            held = store.ids_with([f"{site}@{position}"])
            self.ids[site] = [i for i in ids if i in held]
        self.row = {site: {i: n for n, i in enumerate(v)} for site, v in self.ids.items()}
        self.variance, self.epsilon = variance, epsilon
        self.baselines, self.random_draws, self.permutations, self.seed = baselines, random_draws, permutations, seed
        self._raw: dict[str, np.ndarray] = {}
        self._reduced: dict[tuple, tuple[np.ndarray, int, int]] = {}
        self._random: dict[tuple[int, int, int], float] = {}
        self.ks: list[int] = []  # every k the SVD step kept, for the summary
        self.compared: list[int] = []  # the item counts compared, for the small-sample note

    def clear(self) -> None:
        self._raw.clear()
        self._reduced.clear()

    def raw(self, modality: str, point: Point, ids: list[str]) -> np.ndarray:
        site = self.sites[modality][point]
        if site not in self._raw:
            self._raw[site] = reps.load_layer(self.store, site, self.position, self.ids[site])
        return self._raw[site][[self.row[site][i] for i in ids]]

    def reduced(self, modality: str, point: Point, ids: list[str]) -> tuple[np.ndarray, int, int]:
        """Whitened SVD-reduced vectors, the k kept and the width they were reduced from."""
        key = (modality, point, tuple(ids))
        if key not in self._reduced:
            x = self.raw(modality, point, ids)
            r = svd_reduce(x, self.variance)
            self._reduced[key] = (whiten(r, self.epsilon), r.shape[1], x.shape[1])
            self.ks.append(r.shape[1])
            self.compared.append(len(ids))
        return self._reduced[key]

    def compare(self, a: tuple[str, Point, list[str]], b: tuple[str, Point, list[str]]) -> Score:
        wx, kx, dx = self.reduced(*a)
        wy, ky, dy = self.reduced(*b)
        perms = self.permutations if "shuffled" in self.baselines else 0
        r = svcca_reduced(wx, wy, kx, ky, perms, self.seed)
        random = float("nan")
        if "random" in self.baselines:
            size = (len(a[2]), dx, dy)
            if size not in self._random:
                self._random[size] = random_vectors_baseline(*size, self.variance, self.epsilon, self.random_draws,
                                                             self.seed)
            random = self._random[size]
        return Score(r.similarity, random, r.shuffled, kx, ky)
