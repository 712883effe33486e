"""SVCCA over 24 layers x 350 items x 1024 dims with a 5-permutation baseline, as a ratio against plain NumPy.

The plain side is what one writes from the paper without thinking about cost: per layer and per permutation,
centre + SVD + keep 90% of s², then ``np.cov`` of both sides stacked, ``inv`` + ``scipy.linalg.sqrtm`` for the
inverse square roots, and an SVD. The probe side (``svcca.svcca``) reuses each side's SVD and whitening for all
permutations (shuffling rows changes only Σxy). Both run in the same process, alternating, on the same data;
the scores must agree, and reordering the items identically on both sides must not change them.

Run: ``python benchmarks/bench_svcca.py [--layers 24] [--items 350] [--dims 1024] [--repeats 3] [--permutations 5]
[--threads N]``. On a shared, busy machine pass ``--threads 1``: BLAS thread pools then only add contention.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
from lalm_probe.plugins.analyses.svcca import svcca
from threadpoolctl import threadpool_limits

VARIANCE, EPSILON = 0.9, 1e-10


def planted_layers(layers: int, items: int, dims: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two sides sharing a 32-d latent per item whose weight grows with depth, plus independent noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(items, 32))
    out = []
    for layer in range(layers):
        w = 0.2 + 2.0 * layer / max(layers - 1, 1)
        x = w * latent @ rng.normal(size=(32, dims)) + rng.normal(size=(items, dims))
        y = w * latent @ rng.normal(size=(32, dims)) + rng.normal(size=(items, dims))
        out.append((x, y))
    return out


def naive_svcca(x: np.ndarray, y: np.ndarray) -> float:
    """The straightforward implementation: SVD truncation, then CCA with np.cov and sqrtm of the inverses."""
    def reduce(a: np.ndarray) -> np.ndarray:
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), VARIANCE - 1e-12) + 1)
        return (u[:, :k] * s[:k]).T  # (k, items), cca_core's layout

    rx, ry = reduce(x), reduce(y)
    kx = rx.shape[0]
    cov = np.cov(rx, ry)
    sxx, sxy, syy = cov[:kx, :kx], cov[:kx, kx:], cov[kx:, kx:]
    xmax, ymax = np.abs(sxx).max(), np.abs(syy).max()
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    ixx = np.real(scipy.linalg.sqrtm(np.linalg.inv(sxx + EPSILON * np.eye(kx))))
    iyy = np.real(scipy.linalg.sqrtm(np.linalg.inv(syy + EPSILON * np.eye(len(syy)))))
    return float(np.abs(np.linalg.svd(ixx @ sxy @ iyy, compute_uv=False)).mean())


def run_naive(data: list[tuple[np.ndarray, np.ndarray]], permutations: int) -> tuple[float, list[tuple[float, float]]]:
    start = time.perf_counter()
    scores = []
    for x, y in data:
        rng = np.random.default_rng(0)
        base = np.mean([naive_svcca(x, y[rng.permutation(len(y))]) for _ in range(permutations)]) \
            if permutations else np.nan
        scores.append((naive_svcca(x, y), float(base)))
    return time.perf_counter() - start, scores


def run_probe(data: list[tuple[np.ndarray, np.ndarray]], permutations: int) -> tuple[float, list[tuple[float, float]]]:
    start = time.perf_counter()
    scores = []
    for x, y in data:
        r = svcca(x, y, VARIANCE, EPSILON, permutations=permutations, seed=0)
        scores.append((r.similarity, r.shuffled))
    return time.perf_counter() - start, scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--items", type=int, default=350)
    ap.add_argument("--dims", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--permutations", type=int, default=5, help="baseline permutations (0: scores only)")
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's own)")
    args = ap.parse_args()
    perms = args.permutations
    data = planted_layers(args.layers, args.items, args.dims)
    with threadpool_limits(limits=args.threads):
        probe_t, naive_t = [], []
        for _ in range(args.repeats):  # alternate so machine noise hits both sides
            t, ours = run_probe(data, perms)
            probe_t.append(t)
            t, ref = run_naive(data, perms)
            naive_t.append(t)
        perm = np.random.default_rng(1).permutation(args.items)
        _, shuffled = run_probe([(x[perm], y[perm]) for x, y in data], perms)
    ours_a, ref_a, shuf_a = np.array(ours), np.array(ref), np.array(shuffled)
    score_gap = float(np.abs(ours_a[:, 0] - ref_a[:, 0]).max())
    order_gap = float(np.abs(ours_a[:, 0] - shuf_a[:, 0]).max())
    print(f"SVCCA, {args.layers} layers x {args.items} items x {args.dims} dims, variance {VARIANCE}, "
          f"{perms} baseline permutations")
    print(f"  probe : {min(probe_t):7.2f} s (best of {args.repeats})")
    redone = ", everything redone per permutation" if perms else ""
    print(f"  numpy : {min(naive_t):7.2f} s (np.cov + sqrtm{redone})")
    print(f"  ratio : {min(naive_t) / min(probe_t):7.2f}x faster")
    print(f"  score agreement with the plain implementation: max |diff| = {score_gap:.2e}")
    print(f"  item order: max |diff| after reordering items = {order_gap:.2e}")
    print("  per layer (svcca / baseline): " + ", ".join(f"{s:.3f}/{b:.3f}" for s, b in ours_a[::6]))
    assert score_gap < 1e-6, "the probe and the plain implementation disagree"
    assert order_gap < 1e-9, "SVCCA depends on the order of the items"


if __name__ == "__main__":
    main()
