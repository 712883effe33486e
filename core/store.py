"""On-disk activation store: sharded, with a manifest, resumable.

A collection writes shards of rows (``shard-00000.npz`` holds ``ids`` and one array per ``site@position`` key)
and records each finished shard in ``manifest.json``. Both are written to a temporary name and renamed, so an
interrupted run leaves only complete shards behind; resuming skips the ids already stored. Analyses read from
the store, so several analyses share one collection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import UserError

MANIFEST = "manifest.json"


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


class ActivationStore:
    """A directory of activation shards described by a manifest.

    ``config`` identifies what was collected (model, checkpoint, dataset hash, sites, positions, dtype,
    interventions); opening an existing store with a different config is refused instead of mixing data.
    """

    def __init__(self, root: str | Path, config: dict[str, Any], dtype: str = "float32") -> None:
        self.root = Path(root)
        self.dtype = np.dtype(dtype)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / MANIFEST
        if path.exists():
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise UserError(f"Activation store manifest {path} is corrupt; delete the folder to start over.") from None
            if manifest["config"] != json.loads(json.dumps(config, default=str)):
                raise UserError(f"The activation store at {self.root} was collected with a different configuration "
                                "(model, data, sites or interventions); use another --out folder or delete it.")
            self.manifest = manifest
        else:
            self.manifest = {"config": config, "dtype": self.dtype.name, "shards": [], "complete": False}
            _atomic_write_json(path, self.manifest)
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffer_ids: list[str] = []

    @classmethod
    def open(cls, root: str | Path) -> "ActivationStore":
        """Open an existing store for reading."""
        path = Path(root) / MANIFEST
        if not path.exists():
            raise UserError(f"No activation store at {root} (missing {MANIFEST}).")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        return cls(root, manifest["config"], manifest["dtype"])

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def stored_ids(self) -> set[str]:
        return {i for shard in self.manifest["shards"] for i in shard["ids"]}

    def ids_with(self, keys: Iterable[str]) -> set[str]:
        """Ids whose rows hold every key (text items, for instance, have no speech-encoder keys)."""
        wanted = set(keys)
        return {i for shard in self.manifest["shards"] if wanted <= set(shard["keys"]) for i in shard["ids"]}

    def add(self, ids: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        """Buffer rows; ``flush`` writes them as one shard (rows with other keys, e.g. text items without
        speech-encoder sites, start a new shard)."""
        if self._buffer_ids and set(arrays) != set(self._buffer):
            self.flush()
        for key, arr in arrays.items():
            if len(arr) != len(ids):
                raise ValueError(f"{key}: {len(arr)} rows for {len(ids)} ids")
            self._buffer.setdefault(key, []).append(np.asarray(arr, dtype=self.dtype))
        self._buffer_ids.extend(ids)

    @property
    def buffered(self) -> int:
        return len(self._buffer_ids)

    def flush(self) -> None:
        """Write buffered rows as a shard, then record it in the manifest (in that order)."""
        if not self._buffer_ids:
            return
        name = f"shard-{len(self.manifest['shards']):05d}.npz"
        tmp = self.root / (name + ".tmp.npz")
        arrays = {f"a{i}": np.concatenate(v) for i, v in enumerate(self._buffer.values())}
        np.savez(tmp, ids=np.array(self._buffer_ids), **arrays)
        os.replace(tmp, self.root / name)
        self.manifest["shards"].append({"file": name, "ids": list(self._buffer_ids),
                                        "keys": {k: f"a{i}" for i, k in enumerate(self._buffer)}})
        _atomic_write_json(self.root / MANIFEST, self.manifest)
        self._buffer, self._buffer_ids = {}, []

    def mark_complete(self) -> None:
        self.flush()
        self.manifest["complete"] = True
        _atomic_write_json(self.root / MANIFEST, self.manifest)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for s in self.manifest["shards"] for k in s["keys"]))

    def load(self, keys: Iterable[str] | None = None, order: Sequence[str] | None = None
             ) -> tuple[list[str], dict[str, np.ndarray]]:
        """Read rows back as ``(ids, {key: array})``; ``order`` (a list of ids) fixes the row order."""
        wanted = list(keys) if keys is not None else self.keys()
        missing_keys = [k for k in wanted if k not in self.keys()]
        if missing_keys:
            raise UserError(f"The activation store has no '{missing_keys[0]}'; it holds: {', '.join(self.keys())}.")
        ids: list[str] = []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in wanted}
        for shard in self.manifest["shards"]:
            present = [k for k in wanted if k in shard["keys"]]
            if not present:
                continue  # rows of another kind (e.g. text items when speech-encoder keys are asked for)
            if len(present) < len(wanted):
                absent = next(k for k in wanted if k not in shard["keys"])
                raise UserError(f"Items such as '{shard['ids'][0]}' have no '{absent}' (their inputs never reach "
                                f"that site), so it cannot be loaded together with '{present[0]}'.")
            with np.load(self.root / shard["file"]) as data:
                ids.extend(str(i) for i in data["ids"])
                for k in wanted:
                    parts[k].append(data[shard["keys"][k]])
        arrays = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
        if order is not None:
            where = {i: n for n, i in enumerate(ids)}
            missing = [i for i in order if i not in where]
            if missing:
                raise UserError(f"The activation store lacks {len(missing)} of the requested items for "
                                f"{wanted[0] if wanted else 'these keys'}, e.g. '{missing[0]}'.")
            idx = np.array([where[i] for i in order], dtype=int)
            arrays = {k: v[idx] for k, v in arrays.items()}
            ids = list(order)
        return ids, arrays


class OutputStore:
    """Generated outputs as JSON lines (``{"id", "output", ...}``), appended per batch and resumable.

    Lines go to ``<name>.partial`` while the run is going; the file gets its final name only when every item
    is in, so a file called ``outputs.jsonl`` is always complete.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        if self.partial.is_file():  # drop a line an interruption cut short, so appends start clean
            kept = self._rows(self.partial)
            self.partial.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in kept),
                                    encoding="utf-8")

    @property
    def complete(self) -> bool:
        return self.path.is_file()

    def _rows(self, path: Path) -> list[dict[str, Any]]:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by an interruption; it is generated again
        return rows

    def stored_ids(self) -> set[str]:
        path = self.path if self.complete else self.partial
        return {r["id"] for r in self._rows(path)} if path.is_file() else set()

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.complete:
            raise UserError(f"{self.path} is already complete; use another --out folder to generate again.")
        with open(self.partial, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def mark_complete(self, order: Sequence[str]) -> None:
        """Rewrite in dataset order under the final name."""
        rows = {r["id"]: r for r in self._rows(self.partial)} if self.partial.is_file() else {}
        missing = [i for i in order if i not in rows]
        if missing:
            raise UserError(f"{len(missing)} items have no output (e.g. '{missing[0]}'); the run is incomplete.")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(rows[i], ensure_ascii=False, default=str) + "\n" for i in order),
                       encoding="utf-8")
        os.replace(tmp, self.path)
        self.partial.unlink(missing_ok=True)

    def load(self, order: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if not self.complete:
            raise UserError(f"{self.path} was not completed; rerun with the same --out to finish it.")
        rows = self._rows(self.path)
        if order is None:
            return rows
        by_id = {r["id"]: r for r in rows}
        return [by_id[i] for i in order]
