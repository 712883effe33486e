"""Streaming one key out of the activation store: peak memory over 20k rows vs 1k rows, and speed vs NumPy.

Each store is written once (rows of ``--width`` float32 units in segments of 256 rows, as collection writes them);
then a fresh process streams the key in chunks of ``--chunk`` rows (a running mean, as an analysis would) and
reports its peak resident memory. The baseline for speed is ``np.load`` of one contiguous ``.npy`` holding the same
rows, read in the same chunks through a memory map: the floor for reading those bytes.
Run: ``python benchmarks/bench_store.py [--width 1024] [--chunk 1024]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lalm_probe.core.store import ActivationStore


def write(root: Path, rows: int, width: int) -> None:
    store = ActivationStore(root / "store", {"bench": rows})
    rng = np.random.default_rng(0)
    for start in range(0, rows, 256):
        n = min(256, rows - start)
        store.add([f"i{k}" for k in range(start, start + n)], {"lm.0.out@last": rng.standard_normal((n, width),
                                                                                               dtype=np.float32)})
        store.flush()
    store.mark_complete()
    flat = np.concatenate([np.asarray(store.array("lm.0.out@last")[a:a + 4096]) for a in range(0, rows, 4096)])
    np.save(root / "flat.npy", flat)


def stream(root: Path, chunk: int, flat: bool) -> dict[str, float]:
    """In a fresh process: stream the key, return peak RSS (MiB) and seconds."""
    start = time.perf_counter()
    total = None
    if flat:
        data = np.load(root / "flat.npy", mmap_mode="r")
        blocks = (np.asarray(data[a:a + chunk]) for a in range(0, len(data), chunk))
    else:
        array = ActivationStore.open(root / "store").array("lm.0.out@last")
        blocks = (values for _, values in array.chunks(chunk))
    for block in blocks:
        total = block.sum(0, dtype=np.float64) if total is None else total + block.sum(0, dtype=np.float64)
    seconds = time.perf_counter() - start
    return {"peak_mib": peak_mib(), "seconds": seconds, "check": float(total.sum())}


def peak_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child
    started by a big parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(root: Path, chunk: int, flat: bool) -> dict[str, float]:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_store as b; "
            f"from pathlib import Path; print(json.dumps(b.stream(Path({str(root)!r}), {chunk}, {flat})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (1000, 20000):
            root = Path(tmp) / str(rows)
            write(root, rows, args.width)
            store, flat = measure(root, args.chunk, False), measure(root, args.chunk, True)
            assert abs(store["check"] - flat["check"]) <= 1e-6 * max(1.0, abs(flat["check"]))
            results[rows] = store
            print(f"{rows:>6} rows x {args.width} units ({rows * args.width * 4 / 2**20:.0f} MiB): streaming peak RSS "
                  f"{store['peak_mib']:.0f} MiB, {store['seconds']:.2f} s; plain np.load memmap {flat['seconds']:.2f} s "
                  f"(ratio {store['seconds'] / flat['seconds']:.2f})")
    chunk_mib = args.chunk * args.width * 4 / 2**20
    small, big = results[1000]["peak_mib"], results[20000]["peak_mib"]
    print(f"peak 20k / (peak 1k + one chunk of {chunk_mib:.0f} MiB) = {big / (small + chunk_mib):.3f}")


if __name__ == "__main__":
    main()
