"""The math of the svcca analysis: pure functions on arrays, tested against reference implementations."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

EPSILON = 1e-10

# ---- the math --------------------------------------------------------------------------------------------
def variance_rank(eigenvalues: np.ndarray, variance: float) -> int:
    """Smallest k whose top-k directions hold ``variance`` of the total variance.

    ``eigenvalues`` are the squared singular values s² of the centred data, in descending order; directions
    below numerical rank are never kept.
    """
    s2 = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = s2.sum()
    if total <= 0:
        return 0
    frac = np.cumsum(s2) / total
    k = int(np.searchsorted(frac, min(variance, 1.0) - 1e-12) + 1)
    rank = int((s2 > s2[0] * len(s2) * np.finfo(float).eps).sum())
    return min(k, rank)


def svd_reduce(acts: np.ndarray, variance: float = 0.9) -> np.ndarray:
    """Project centred ``(items, neurons)`` activations onto the top-k singular directions (k by ``variance``).

    Returns ``(items, k)`` = ``U[:, :k]·s[:k]``, the tutorial's ``svacts`` transposed; k < items so CCA is defined.
    The SVD is taken through the eigen-decomposition of the smaller Gram matrix (items × items when there are
    fewer items than neurons): same U and s² for the kept directions, several times faster for 350 × 4096.
    """
    x = np.asarray(acts, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    n, d = x.shape
    if n <= d:
        s2, u = np.linalg.eigh(x @ x.T)
        s2, u = s2[::-1], u[:, ::-1]
        k = min(variance_rank(s2, variance), max(n - 1, 0))
        return u[:, :k] * np.sqrt(np.clip(s2[:k], 0.0, None))
    s2, v = np.linalg.eigh(x.T @ x)
    s2, v = s2[::-1], v[:, ::-1]
    k = min(variance_rank(s2, variance), max(n - 1, 0))
    return x @ v[:, :k]


def whiten(x: np.ndarray, epsilon: float = EPSILON) -> np.ndarray:
    """Centred data times ``cca_core``'s regularised inverse square root covariance, scaled so that
    ``whiten(x).T @ whiten(y)`` equals ``Σxx^-1/2 Σxy Σyy^-1/2`` exactly as ``cca_core`` builds it."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    xc = x - x.mean(axis=0, keepdims=True)
    cov = xc.T @ xc / (n - 1)
    scale = np.abs(cov).max() if cov.size else 0.0
    if scale <= 0:
        return np.zeros((n, 0))
    cov = cov / scale
    keep = np.abs(np.diag(cov)) >= epsilon  # cca_core's remove_small
    xc, cov = xc[:, keep], cov[np.ix_(keep, keep)] + epsilon * np.eye(int(keep.sum()))
    w, v = np.linalg.eigh(cov)
    cutoff = 1e-15 * max(w.max(), 0.0)  # np.linalg.pinv's default rcond, as cca_core inverts with pinv
    inv_sqrt = np.where(w > cutoff, 1.0 / np.sqrt(np.clip(w, cutoff, None)), 0.0)
    return (xc @ (v * inv_sqrt) @ v.T) / np.sqrt((n - 1) * scale)


def correlations_from_whitened(wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Canonical correlations (descending) of two whitened sets with the same rows."""
    if wx.shape[1] == 0 or wy.shape[1] == 0:
        return np.zeros(0)
    return np.abs(np.linalg.svd(wx.T @ wy, compute_uv=False))


def cca_correlations(x: np.ndarray, y: np.ndarray, epsilon: float = EPSILON) -> np.ndarray:
    """``cca_core.get_cca_similarity``'s ``cca_coef1`` for ``(items, neurons)`` inputs (min(dx, dy) values)."""
    _check_pair(x, y)
    return correlations_from_whitened(whiten(x, epsilon), whiten(y, epsilon))


class SVCCA(NamedTuple):
    similarity: float  # plain mean of the canonical correlations
    shuffled: float  # the same on shuffled pairings of the same vectors (NaN without permutations)
    kx: int
    ky: int
    correlations: np.ndarray


def svcca(x: np.ndarray, y: np.ndarray, variance: float = 0.9, epsilon: float = EPSILON,
          permutations: int = 0, seed: int = 0) -> SVCCA:
    """SVCCA similarity of two ``(items, neurons)`` sets whose rows are the same items, with the shuffled-pairs
    baseline over ``permutations`` shufflings of one side's rows.

    The widths may differ. Rows must be paired (row i of x and of y are one item).
    """
    _check_pair(x, y)
    rx, ry = svd_reduce(x, variance), svd_reduce(y, variance)
    return svcca_reduced(whiten(rx, epsilon), whiten(ry, epsilon), rx.shape[1], ry.shape[1], permutations, seed)


def svcca_reduced(wx: np.ndarray, wy: np.ndarray, kx: int, ky: int, permutations: int, seed: int) -> SVCCA:
    rho = correlations_from_whitened(wx, wy)
    sim = float(rho.mean()) if rho.size else float("nan")
    base = float("nan")
    if permutations > 0 and rho.size:
        rng = np.random.default_rng(seed)
        base = float(np.mean([correlations_from_whitened(wx, wy[rng.permutation(len(wy))]).mean()
                              for _ in range(permutations)]))
    return SVCCA(sim, base, kx, ky, rho)


def random_vectors_baseline(items: int, width_x: int, width_y: int, variance: float = 0.9,
                            epsilon: float = EPSILON, draws: int = 5, seed: int = 0) -> float:
    """Lee et al.'s (seed 001) baseline: SVCCA between random vectors of the same sizes as the analysed ones.

    ``items`` rows of ``width_x`` and of ``width_y`` standard normal units, through the same pipeline (SVD step at
    ``variance``, CCA), averaged over ``draws`` draws. It depends only on the sizes: it says what SVCCA gives when
    there is no similarity at all, which with few items and a 90% SVD step is far from 0 (CCA overfits).
    """
    rng = np.random.default_rng(seed)
    return float(np.mean([svcca(rng.standard_normal((items, width_x)), rng.standard_normal((items, width_y)),
                                variance, epsilon).similarity for _ in range(max(1, draws))]))


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"SVCCA needs two (items, neurons) arrays with the same items; got {x.shape} and {y.shape}.")
    if x.shape[0] < 3:
        raise ValueError(f"SVCCA needs at least 3 paired items; got {x.shape[0]}.")


