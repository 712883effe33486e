"""Peak memory and time of the ``neurons`` analysis over a 20k-item activation store vs a 1k-item one.

The analysis reads every stored site lazily and scores it in chunks of units, so its memory should be bounded
by one chunk (about 2**21 values) and the tables it returns (units x columns), not by the store. This builds two
real ``ActivationStore`` folders of decoder sites (``--sites`` x ``--width`` units, 4 language labels, written in
row blocks), then times ``Neurons.analyze`` on each (expertise tables, top/bottom/both sets, placement) with
tracemalloc's peak of Python/NumPy allocations (the memmapped store is file-backed page cache, not counted).
Baselines in the same process: the store's size, and the peak of reading one chunk of every site (the floor).

Run: ``python benchmarks/bench_neurons.py [--items 20000] [--sites 8] [--width 2048]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import stub_view  # noqa: E402  (a real ModelView over declared stacks, no weights)
from lalm_probe.core.data import Dataset, Stimulus  # noqa: E402
from lalm_probe.core.plugin import Stores  # noqa: E402
from lalm_probe.core.store import ActivationStore  # noqa: E402
from lalm_probe.plugins.analyses.neurons.expertise import CHUNK_ELEMENTS  # noqa: E402
from lalm_probe.plugins.analyses.neurons.plugin import Neurons  # noqa: E402

LANGUAGES = ("de", "en", "fr", "ja")


def build(folder: Path, items: int, sites: int, width: int) -> tuple[ActivationStore, Dataset]:
    store = ActivationStore(folder, {"bench": items})
    rng = np.random.default_rng(0)
    labels = [LANGUAGES[i % len(LANGUAGES)] for i in range(items)]
    for a in range(0, items, 2000):
        ids = [f"i{i}" for i in range(a, min(items, a + 2000))]
        store.add(ids, {f"decoder.{s}.mlp_up@last": rng.normal(size=(len(ids), width)).astype(np.float32)
                        for s in range(sites)}, ["x"] * len(ids))
        store.flush()
    store.mark_complete()
    data = Dataset([Stimulus(f"i{i}", text="x", labels={"language": lab}) for i, lab in enumerate(labels)])
    return ActivationStore.open(folder), data


def measure(store: ActivationStore, data: Dataset, sites: int, width: int) -> tuple[float, float, float]:
    view = stub_view({"decoder": {"layers": sites, "runs": "per_step", "components": ("mlp_up",)}})
    view._plugin.width = lambda site: width
    analysis = Neurons(stacks=["decoder"], components=["mlp_up"], steps=[], k=100, modality="joint")
    ids = [it.id for it in data]
    step = max(1, CHUNK_ELEMENTS // len(ids))
    tracemalloc.start()
    for s in range(sites):  # the floor: one chunk of every site read
        store.array(f"decoder.{s}.mlp_up@last", ids)[:, :step]
    floor = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tracemalloc.start()
    start = time.perf_counter()
    analysis.analyze(view, data, Stores(baseline=store))
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20, floor / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for items in (args.items, 1000):
            store, data = build(Path(tmp) / str(items), items, args.sites, args.width)
            rows.append((items, *measure(store, data, args.sites, args.width)))
    units = args.sites * args.width
    print(f"neurons over {units} units ({args.sites} sites x {args.width}), {len(LANGUAGES)} label values, k=100:")
    for items, peak, floor, seconds in rows:
        print(f"  {items:6d} items ({items * units * 4 / 2**30:5.2f} GiB store): peak {peak:7.1f} MiB "
              f"(one chunk of every site: {floor:6.1f} MiB), {seconds:6.1f} s")
    print(f"  peak ratio {rows[0][1] / rows[1][1]:.2f} for {args.items / 1000:.0f}x the items")


if __name__ == "__main__":
    main()
