"""Per-unit AP for every unit, as ratios against the per-unit sklearn loop and against one argsort.

Seed 002 scores every neuron of SeamlessM4T v2 (millions of units) by AP over thousands of items; the released
code calls ``sklearn.metrics.average_precision_score`` once per unit. This benchmark times, on the same
``(items, units)`` float32 matrix (normal scores with a planted label signal in some units, 20% positives):

- ``average_precision`` (AP only) and ``unit_expertise`` (AP + forcing values), default chunking;
- (a) the sklearn loop, timed on the first ``--sklearn-units`` units and **extrapolated** linearly to all units
  (it is far too slow to run on all of them); the values of both must agree to 1e-12 on those units;
- (b) one ``np.argsort(x, axis=0)`` of the whole matrix: the floor for any exact, sort-based AP.

It does so twice: on float32 scores and on the same scores rounded to bfloat16 (heavy ties, what a bf16 store
holds). Then peak memory: ``unit_expertise`` over a float32 ``np.memmap`` of ``--items`` x ``--mem-units`` and
over one of 1000 x ``--mem-units`` (tracemalloc peak of Python/NumPy allocations; the memmap's own pages are
file-backed cache, not counted). Each figure is the best of ``--repeats`` runs.

Run: ``python benchmarks/bench_ap.py [--items 20000] [--units 4000] [--sklearn-units 40] [--mem-units 10000]
[--repeats 3] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
from lalm_probe.plugins.analyses.neurons.expertise import average_precision, unit_expertise
from sklearn.metrics import average_precision_score


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def planted(items: int, units: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(items) < 0.2
    x = rng.normal(size=(items, units)).astype(np.float32)
    x[:, ::50] += np.float32(1.5) * labels[:, None]  # every 50th unit fires for the label
    return x, labels


def bf16(x: np.ndarray) -> np.ndarray:
    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def speed(name: str, x: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> None:
    items, units = x.shape
    floor, _ = best_of(lambda: np.argsort(x, axis=0), args.repeats)
    t_ap, ap = best_of(lambda: average_precision(x, labels, device=args.device), args.repeats)
    t_exp, _ = best_of(lambda: unit_expertise(x, labels, device=args.device), args.repeats)
    k = min(args.sklearn_units, units)
    t_sk, ref = best_of(lambda: [average_precision_score(labels, x[:, j]) for j in range(k)], 1)
    gap = float(np.abs(np.asarray(ap)[:k] - np.asarray(ref)).max())
    assert gap <= 1e-12, f"AP differs from sklearn by {gap}"
    sk_all = t_sk / k * units
    print(f"\n{name}: {items} items x {units} units, {len(np.unique(x[:, 1]))} distinct values in unit 1")
    print(f"  np.argsort(axis=0), the floor      {floor:8.3f} s")
    print(f"  average_precision                  {t_ap:8.3f} s   = {t_ap / floor:5.2f} x argsort")
    print(f"  unit_expertise (AP + forcing)      {t_exp:8.3f} s   = {t_exp / floor:5.2f} x argsort")
    print(f"  sklearn loop, {k} units timed       {t_sk:8.3f} s   -> {sk_all:8.1f} s for all {units} units "
          f"(extrapolated) = {sk_all / t_ap:6.0f} x average_precision")
    print(f"  max |AP - sklearn| over {k} units: {gap:.1e}")


def peak_memory(items: int, units: int, labels: np.ndarray, folder: Path) -> tuple[float, float]:
    path = folder / f"r{items}.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(items, units))
    rng = np.random.default_rng(1)
    for a in range(0, units, 1000):
        mm[:, a:a + 1000] = rng.normal(size=(items, min(1000, units - a))).astype(np.float32)
    mm.flush()
    del mm
    ro = np.load(path, mmap_mode="r")
    tracemalloc.start()
    start = time.perf_counter()
    unit_expertise(ro, labels[:items])
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--units", type=int, default=4000)
    parser.add_argument("--sklearn-units", type=int, default=40)
    parser.add_argument("--mem-units", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="torch device for the sort (default: NumPy on the CPU)")
    args = parser.parse_args()

    x, labels = planted(args.items, args.units)
    speed("float32 scores", x, labels, args)
    speed("bf16-rounded scores (heavy ties)", bf16(x), labels, args)
    del x

    with tempfile.TemporaryDirectory() as tmp:
        big_mb, big_s = peak_memory(args.items, args.mem_units, labels, Path(tmp))
        small_mb, small_s = peak_memory(1000, args.mem_units, labels, Path(tmp))
    gb = args.items * args.mem_units * 4 / 2**30
    print(f"\npeak memory of unit_expertise over a float32 memmap ({args.mem_units} units, default chunking):")
    print(f"  {args.items:6d} items ({gb:5.2f} GiB on disk): {big_mb:7.1f} MiB peak, {big_s:6.2f} s")
    print(f"  {1000:6d} items ({gb * 1000 / args.items:5.2f} GiB on disk): {small_mb:7.1f} MiB peak, {small_s:6.2f} s")
    print(f"  ratio {big_mb / small_mb:.2f} for {args.items / 1000:.0f}x the items")


if __name__ == "__main__":
    main()
