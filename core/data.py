"""Stimuli and datasets: what a run feeds the model.

An item carries audio (a file or an array with its rate) and/or text, an id, labels and an optional
prompt. Parallel items (one sentence in several languages or modalities) share ``labels["semantic_id"]``.
Audio is decoded lazily so a dataset of thousands of files costs nothing until it is batched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import UserError, unknown_name
from .files import write_text


@dataclass
class Stimulus:
    """One input item. ``audio`` is a path or a 1-D/2-D array (then ``sample_rate`` is required)."""

    id: str
    audio: str | Path | np.ndarray | None = None
    sample_rate: int | None = None
    text: str | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    normalize: str | None = None  # "peak": audio scaled to a peak of 1, i.e. into [-1, 1] (seed 000, Fig. 7)

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    def fingerprint(self) -> str:
        """A content hash so a store can tell whether it was collected from the same data."""
        h = hashlib.sha256()
        h.update(json.dumps([self.id, self.text, self.prompt, self.labels], sort_keys=True, default=str).encode())
        if self.normalize:  # only when set, so existing stores keep their fingerprints
            h.update(f"normalize={self.normalize}".encode())
        if isinstance(self.audio, np.ndarray):
            h.update(np.ascontiguousarray(self.audio, dtype=np.float32).tobytes())
            h.update(str(self.sample_rate).encode())
        elif self.audio is not None:
            p = Path(self.audio)
            h.update(str(p).encode())
            if p.exists():
                st = p.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


@dataclass
class Dataset:
    """An ordered list of stimuli with a name; ids are unique."""

    items: list[Stimulus]
    name: str = "dataset"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for it in self.items:
            if it.id in seen:
                raise UserError(f"Dataset '{self.name}' has the id '{it.id}' more than once; ids must be unique.")
            seen.add(it.id)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Stimulus]:
        return iter(self.items)

    def __getitem__(self, i: int) -> Stimulus:
        return self.items[i]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(it.fingerprint().encode())
        return h.hexdigest()[:16]

    def label_values(self, key: str) -> list[Any]:
        """Labels of every item under ``key``; a clear error names the first item that lacks it."""
        out = []
        for it in self.items:
            if key not in it.labels:
                have = ", ".join(sorted(it.labels)) or "none"
                raise UserError(f"Item '{it.id}' has no label '{key}' (its labels: {have}).")
            out.append(it.labels[key])
        return out

    def subset(self, indices: Sequence[int], name: str | None = None) -> "Dataset":
        return Dataset([self.items[i] for i in indices], name=name or self.name)

    def split(self, size: int, seed: int = 0, stratify: str | None = None) -> tuple["Dataset", "Dataset"]:
        """A seeded split into ``size`` items and the rest, each in dataset order; with ``stratify``, every value
        of that label keeps its share (corpora such as SAKURA list items grouped by class, so a split that takes
        the first items would see one class only)."""
        if not 0 < size < len(self):
            raise UserError(f"A split of {size} items needs a dataset of more than {size} items (this one has "
                            f"{len(self)}); lower the split size.")
        from sklearn.model_selection import train_test_split

        labels = [str(v) for v in self.label_values(stratify)] if stratify else None
        try:
            first, _ = train_test_split(list(range(len(self))), train_size=size, random_state=seed, stratify=labels)
        except ValueError as exc:
            raise UserError(f"Cannot split {len(self)} items into {size} stratified by '{stratify}': {exc}") from None
        chosen = set(first)
        return (self.subset(sorted(chosen), f"{self.name}-split"),
                self.subset([i for i in range(len(self)) if i not in chosen], f"{self.name}-rest"))


MANIFEST_KEYS = {"id", "audio", "text", "labels", "prompt", "sample_rate"}


def load_manifest(path: str | Path) -> Dataset:
    """Read a JSONL manifest: one object per line with id, audio, text, labels, prompt (all but id optional)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Dataset manifest not found: {path}")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {n}: not valid JSON ({exc.msg}).") from None
        if not isinstance(obj, dict) or "id" not in obj:
            raise UserError(f"{path}, line {n}: each line must be an object with at least an 'id'.")
        extra = set(obj) - MANIFEST_KEYS
        if extra:
            raise UserError(f"{path}, line {n}: unknown keys {sorted(extra)}; allowed: {sorted(MANIFEST_KEYS)}.")
        labels = obj.get("labels") or {}
        if not isinstance(labels, dict):
            raise UserError(f"{path}, line {n}: 'labels' must be an object.")
        audio = obj.get("audio")
        if audio is not None:
            audio = Path(audio) if Path(audio).is_absolute() else (path.parent / audio)
        if audio is None and obj.get("text") is None:
            raise UserError(f"{path}, line {n}: item '{obj['id']}' has neither audio nor text.")
        items.append(Stimulus(id=str(obj["id"]), audio=audio, text=obj.get("text"), labels=labels,
                              prompt=obj.get("prompt")))
    if not items:
        raise UserError(f"Dataset manifest {path} has no items.")
    return Dataset(items, name=path.stem)


def write_manifest(dataset: Dataset, path: str | Path) -> Path:
    """Write items whose audio are files as a JSONL manifest (audio paths relative to it when possible)."""
    path = Path(path)
    lines = []
    for it in dataset:
        obj: dict[str, Any] = {"id": it.id}
        if it.audio is not None:
            if isinstance(it.audio, np.ndarray):
                raise UserError(f"Item '{it.id}' holds audio in memory; write it to a file before writing a manifest.")
            a = Path(it.audio)
            try:
                obj["audio"] = str(a.resolve().relative_to(path.parent.resolve()))
            except ValueError:
                obj["audio"] = str(a.resolve())
        for key in ("text", "prompt"):
            if getattr(it, key) is not None:
                obj[key] = getattr(it, key)
        if it.labels:
            obj["labels"] = it.labels
        lines.append(json.dumps(obj, ensure_ascii=False))
    return write_text(path, "\n".join(lines) + "\n")


# Named dataset sources ("synth:parallel", "fleurs:/path") come from plugins through this table.
DatasetSource = Callable[[str], Dataset]


# Options every dataset takes after its own, in the same query string: ``?where=gender:female&normalize=peak``.
GENERIC_OPTIONS = ("where", "normalize")
NORMALIZE = ("peak",)


def split_generic(spec: str) -> tuple[str, dict[str, str]]:
    """``spec`` without the options every dataset takes (``where``, ``normalize``), and those options."""
    head, q, query = spec.partition("?")
    if not q:
        return spec, {}
    keep, opts = [], {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key.strip() in GENERIC_OPTIONS:
            opts[key.strip()] = value.strip()
        else:
            keep.append(part)
    return head + ("?" + "&".join(keep) if keep else ""), opts


def select_where(dataset: Dataset, where: str) -> Dataset:
    """Items whose labels match every ``key:value`` of ``where`` (comma-separated; ``key:a|b`` takes either),
    e.g. ``gender:female,accent:us``: one gender within one accent."""
    conditions: dict[str, set[str]] = {}
    for part in filter(None, (p.strip() for p in where.split(","))):
        key, colon, values = part.partition(":")
        if not colon or not key.strip() or not values.strip():
            raise UserError(f"where: expected key:value (e.g. where=gender:female,accent:us), got '{part}'.")
        conditions.setdefault(key.strip(), set()).update(v.strip() for v in values.split("|"))
    if not conditions:
        raise UserError("where: expected key:value pairs, e.g. where=gender:female,accent:us.")
    kept = [it for it in dataset if all(str(it.labels.get(k)) in v and k in it.labels for k, v in conditions.items())]
    if not kept:
        seen = {k: sorted({str(it.labels[k]) for it in dataset if k in it.labels}) for k in conditions}
        have = "; ".join(f"{k}: {', '.join(v[:12]) or 'no item has it'}" for k, v in seen.items())
        raise UserError(f"where={where} matches none of the {len(dataset)} items ({have}).")
    return Dataset(kept, name=dataset.name)


def resolve_dataset(spec: str | Path, sources: dict[str, DatasetSource] | None = None) -> Dataset:
    """Turn a ``--data`` argument into a dataset: a manifest path, or ``scheme:argument`` for a named source.

    Any of them takes ``?where=key:value,...`` (items whose labels match) and ``?normalize=peak`` (audio scaled
    to [-1, 1] when decoded) after its own options.
    """
    spec, generic = split_generic(str(spec))
    dataset = _resolve(spec, sources or {})
    if "where" in generic:
        dataset = select_where(dataset, generic["where"])
    if "normalize" in generic:
        if generic["normalize"] not in NORMALIZE:
            raise UserError(f"normalize must be one of {', '.join(NORMALIZE)}, got '{generic['normalize']}'.")
        dataset = Dataset([replace(it, normalize=generic["normalize"]) if it.has_audio else it for it in dataset],
                          name=dataset.name)
    return dataset


def _resolve(spec: str, sources: dict[str, DatasetSource]) -> Dataset:
    if ":" in spec and not Path(spec).exists():
        scheme, _, arg = spec.partition(":")
        if len(scheme) > 1:  # not a Windows drive letter
            if scheme not in sources:
                raise unknown_name("dataset source", scheme, sources)
            return sources[scheme](arg)
    return load_manifest(spec)
