"""On-disk activation store: memory-mappable arrays per key, written in atomic segments, resumable, mergeable.

Layout (format 2), documented for other tools::

    <store>/manifest.json          identity, dtype, and the list of segments
    <store>/segments/00000/        one flush of rows:
        rows.json                  {"ids": [...], "fingerprints": [...]} in row order
        k0000.npy ...              one array per key, shape (rows, *unit shape); NumPy can memory-map it
        k0001.npy + k0001.len.npy  a ragged key (every position of each row): the rows' positions stacked, and
                                   how many each row has
    <store>/parts/<k>-of-<N>/      a store of the same identity written by shard k of N (``--shard k/N``)

A key is ``site@position`` (``lm.3.out@last``); each segment maps its keys to file stems. A segment is written to a
temporary folder and renamed, then recorded in the manifest (written to a temporary name and renamed), so an
interruption leaves only complete segments. Each row carries the fingerprint of the item it was computed from
(audio, text, labels, prompt): a row whose item changed is stale and collected again; the latest row of an id
wins. ``bfloat16`` is stored as its upper 16 bits (``uint16``) and read back as float32. The parts of a sharded
collection are merged by listing their segments, without copying arrays.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .files import publish_dir, temp_dir_for, write_json

MANIFEST = "manifest.json"
FORMAT = 2
DTYPES = ("float32", "float16", "bfloat16")


def _to_disk(array: np.ndarray, dtype: str) -> np.ndarray:
    a = np.asarray(array, dtype=np.float32)
    if dtype == "bfloat16":  # round to nearest even, keep the upper half
        bits = a.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return a.astype(dtype)


def _from_disk(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.asarray(array, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32) if dtype != "float32" else np.asarray(array)


@dataclass
class _Segment:
    root: Path  # the store (or part) the segment belongs to
    entry: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.entry["dir"]

    def rows(self) -> dict[str, Any]:
        return json.loads((self.path / "rows.json").read_text(encoding="utf-8"))

    def open(self, key: str) -> np.ndarray:
        return np.load(self.path / f"{self.entry['files'][key]}.npy", mmap_mode="r")

    def lengths(self, key: str) -> np.ndarray | None:
        path = self.path / f"{self.entry['files'][key]}.len.npy"
        return np.load(path) if path.is_file() else None


class StoredArray:
    """One key over the whole store, read lazily: ``array[rows]`` or ``array[rows, units]`` load only that part.

    Rows follow ``ids`` (the order rows were stored in, or the order asked for). Memory is bounded by what an index
    selects, so a caller can stream a 20k x 100k key by unit chunks (``array[:, a:b]``) or row chunks.
    """

    def __init__(self, key: str, table: dict[str, tuple[_Segment, int, str]], ids: list[str], dtype: str) -> None:
        self.key, self.ids, self.dtype = key, ids, dtype
        self._segments: list[_Segment] = []
        number: dict[int, int] = {}
        self._seg = np.empty(len(ids), dtype=np.int32)  # filled in place: no per-row Python objects are kept
        self._row = np.empty(len(ids), dtype=np.int64)
        for n, i in enumerate(ids):
            seg, row, _ = table[i]
            if id(seg) not in number:
                number[id(seg)] = len(self._segments)
                self._segments.append(seg)
            self._seg[n], self._row[n] = number[id(seg)], row
        first = self._segments[0].open(key) if self._segments else np.zeros((0, 0))
        self.shape = (len(ids), *first.shape[1:])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows, cols = (index if isinstance(index, tuple) else (index, slice(None)))
        picked = np.arange(len(self.ids))[rows]
        single = np.ndim(picked) == 0
        picked = np.atleast_1d(picked)
        out = np.empty((len(picked), *np.empty(self.shape[1:])[cols].shape), dtype=np.float32)
        segs, srcs = self._seg[picked], self._row[picked]
        for s in np.unique(segs):
            where = np.flatnonzero(segs == s)
            order = np.argsort(srcs[where], kind="stable")  # memmaps read fastest in row order
            src = srcs[where][order]
            data = self._segments[s].open(self.key)
            block = data[src[0]:src[-1] + 1] if src[-1] - src[0] + 1 == len(src) else data[src]  # a run: a slice
            out[where[order]] = _from_disk(block[(slice(None), cols)], self.dtype)
        return out[0] if single else out
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = self[:]
        return full if dtype is None else full.astype(dtype)

    def chunks(self, rows: int = 1024) -> Iterator[tuple[list[str], np.ndarray]]:
        """``(ids, values)`` for consecutive blocks of rows: streaming with memory bounded by one block."""
        for start in range(0, len(self.ids), rows):
            yield self.ids[start:start + rows], self[start:start + rows]


class ActivationStore:
    """A folder of activation segments with a manifest; see the module docstring for the layout.

    ``identity`` says what was collected (model, checkpoint, dtype, options, prompts, interventions); opening an
    existing store with a different identity is refused instead of mixing data.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any], dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise UserError(f"Unknown store dtype '{dtype}'; choose one of {', '.join(DTYPES)}.")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        identity = json.loads(json.dumps(identity, default=str))
        if path.exists():
            manifest = self._read_manifest(path)
            if manifest.get("identity") != identity:
                raise UserError(f"The activation store at {self.root} was collected with a different configuration "
                                "(model, prompts or interventions); use another --out folder or delete it.")
            self.manifest = manifest
        else:
            self.manifest = {"format": FORMAT, "identity": identity, "dtype": dtype, "segments": [],
                             "complete": False}
            write_json(path, self.manifest)
        self.dtype = self.manifest["dtype"]
        self._buffer: dict[str, list[Any]] = {}
        self._buffer_ids: list[str] = []
        self._buffer_fps: list[str] = []
        self._ragged: set[str] = set()
        self._absent: set[str] = set()
        self._index: dict[str, dict[str, tuple[_Segment, int, str]]] | None = None

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise UserError(f"Activation store manifest {path} is corrupt; delete the folder to start over.") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"The activation store at {path.parent} was written by an older lalm-probe (format "
                            f"{manifest.get('format', 1)}); delete it to collect again.")
        return manifest

    @classmethod
    def open(cls, root: str | Path) -> "ActivationStore":
        """Open an existing store for reading."""
        path = Path(root) / MANIFEST
        if not path.exists():
            raise UserError(f"No activation store at {root} (missing {MANIFEST}).")
        manifest = cls._read_manifest(path)
        return cls(root, manifest["identity"], manifest["dtype"])

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["identity"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    # ---- writing -----------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], arrays: dict[str, Any], fingerprints: Sequence[str] | None = None,
            absent: Sequence[str] = ()) -> None:
        """Buffer rows; a value is an array ``(rows, ...)`` or, for a ragged key, a list of ``(positions, ...)``
        arrays. ``absent``: keys asked for that these rows cannot have (a text item never reaches a speech
        encoder), recorded so they are not collected again. Rows with other keys start a new segment."""
        if self._buffer_ids and (set(arrays) != set(self._buffer) or set(absent) != self._absent):
            self.flush()
        self._absent = set(absent)
        for key, value in arrays.items():
            if len(value) != len(ids):
                raise ValueError(f"{key}: {len(value)} rows for {len(ids)} ids")
            if isinstance(value, list):
                self._ragged.add(key)
            self._buffer.setdefault(key, []).extend(value if isinstance(value, list) else [value])
        self._buffer_ids.extend(ids)
        self._buffer_fps.extend(fingerprints or [""] * len(ids))

    @property
    def buffered(self) -> int:
        return len(self._buffer_ids)

    def flush(self) -> None:
        """Write buffered rows as a segment, then record it in the manifest (in that order)."""
        if not self._buffer_ids:
            return
        name = f"segments/{len(self.manifest['segments']):05d}"
        tmp = temp_dir_for(self.root / name)
        files: dict[str, str] = {}
        try:
            for i, (key, parts) in enumerate(self._buffer.items()):
                stem = f"k{i:04d}"
                files[key] = stem
                np.save(tmp / f"{stem}.npy", _to_disk(np.concatenate(parts), self.dtype))
                if key in self._ragged:  # one entry per row, of its own length
                    np.save(tmp / f"{stem}.len.npy", np.array([len(p) for p in parts], dtype=np.int64))
            write_json(tmp / "rows.json", {"ids": self._buffer_ids, "fingerprints": self._buffer_fps,
                                           "absent": sorted(self._absent)})
            publish_dir(tmp, self.root / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.manifest["segments"].append({"dir": name, "rows": len(self._buffer_ids), "files": files})
        self.manifest["complete"] = False
        write_json(self.root / MANIFEST, self.manifest)
        self._buffer, self._buffer_ids, self._buffer_fps = {}, [], []
        self._ragged, self._absent = set(), set()
        self._index = None

    def mark_complete(self) -> None:
        self.flush()
        self.manifest["complete"] = True
        write_json(self.root / MANIFEST, self.manifest)

    # ---- parts of a sharded collection --------------------------------------------------------------
    def part(self, k: int, n: int) -> "ActivationStore":
        """The store shard k of N writes (same identity, its own folder)."""
        return ActivationStore(self.root / "parts" / f"{k}-of-{n}", self.identity, self.dtype)

    def _segments(self) -> list[_Segment]:
        segs = [_Segment(self.root, e) for e in self.manifest["segments"]]
        for path in sorted((self.root / "parts").glob("*/" + MANIFEST)):
            part = self._read_manifest(path)
            if part.get("identity") == self.identity:
                segs += [_Segment(path.parent, e) for e in part["segments"]]
        return segs

    # ---- reading -----------------------------------------------------------------------------------
    def _rows(self) -> dict[str, dict[str, tuple[_Segment | None, int, str]]]:
        """key -> id -> (segment, row, fingerprint), segment None where the key is absent for that item; later
        segments override earlier ones."""
        if self._index is None:
            index: dict[str, dict[str, tuple[_Segment | None, int, str]]] = {}
            self._ids: dict[str, None] = {}
            for seg in self._segments():
                rows = seg.rows()
                self._ids.update(dict.fromkeys(rows["ids"]))
                for key, where in [(k, seg) for k in seg.entry["files"]] + [(k, None) for k in rows["absent"]]:
                    table = index.setdefault(key, {})
                    for r, (i, fp) in enumerate(zip(rows["ids"], rows["fingerprints"])):
                        table[i] = (where, r, fp)
            self._index = index
        return self._index

    def _held(self, key: str) -> dict[str, tuple[_Segment, int, str]]:
        table = self._rows().get(key, {})
        if all(v[0] is not None for v in table.values()):
            return table  # the usual case, without a copy of the index
        return {i: v for i, v in table.items() if v[0] is not None}

    def keys(self) -> list[str]:
        return [k for k in self._rows() if self._held(k)]

    def stored_ids(self) -> set[str]:
        """Every id the store has rows for (whatever keys they hold)."""
        self._rows()
        return set(self._ids)

    def ids_with(self, keys: Iterable[str]) -> set[str]:
        """Ids whose rows hold every key (text items, for instance, have no speech-encoder keys)."""
        tables = [self._held(k) for k in keys]
        return set.intersection(*(set(t) for t in tables)) if tables else set()

    def missing(self, keys: Sequence[str], fingerprints: dict[str, str]) -> list[str]:
        """Ids (of ``fingerprints``, in its order) lacking a current row for some key: what must be collected."""
        tables = [self._rows().get(k, {}) for k in keys]
        return [i for i, fp in fingerprints.items() if any(t.get(i, (None, 0, None))[2] != fp for t in tables)]

    def array(self, key: str, order: Sequence[str] | None = None) -> StoredArray:
        """One key as a lazy array, rows in ``order`` (default: stored order)."""
        table = self._held(key)
        if not table:
            raise UserError(f"The activation store has no '{key}'; it holds: {', '.join(self.keys()) or 'nothing'}.")
        ids = list(table) if order is None else list(order)
        lacking = [i for i in ids if i not in table]
        if lacking:
            raise UserError(f"The activation store lacks {len(lacking)} of the requested items for {key}, "
                            f"e.g. '{lacking[0]}'.")
        if any(table[i][0].lengths(key) is not None for i in ids[:1]):
            raise UserError(f"'{key}' holds every position of each item; read it with ragged().")
        return StoredArray(key, table, ids, self.dtype)

    def ragged(self, key: str, order: Sequence[str]) -> list[np.ndarray]:
        """A ragged key (every position of each item): one ``(positions, ...)`` array per id of ``order``."""
        table = self._held(key)
        out = []
        for i in order:
            if i not in table:
                raise UserError(f"The activation store has no '{key}' for item '{i}'.")
            seg, row, _ = table[i]
            lengths = seg.lengths(key)
            if lengths is None:
                raise UserError(f"'{key}' holds one value per item; read it with array().")
            start = int(lengths[:row].sum())
            out.append(_from_disk(seg.open(key)[start:start + int(lengths[row])], self.dtype))
        return out

    def load(self, keys: Iterable[str] | None = None, order: Sequence[str] | None = None
             ) -> tuple[list[str], dict[str, np.ndarray]]:
        """Read whole keys into memory as ``(ids, {key: array})``; ``order`` fixes the rows (default: the ids
        every key holds, in the first key's stored order)."""
        wanted = list(keys) if keys is not None else self.keys()
        if order is None:
            common = self.ids_with(wanted)
            first = self._held(wanted[0]) if wanted else {}
            order = [i for i in first if i in common]
        return list(order), {k: np.asarray(self.array(k, order)) for k in wanted}
