"""Mean-difference steering: add ``scale`` times (mean state of the items with one label value − mean state of the
items with another, or of every other item) at a site.

The vector is read at ``site`` and position ``read`` (``last``, a span mean, ``step:t``...), either from a
calibration split of the data (``probe_size`` items holding the two values, seeded and stratified by the label;
the run evaluates the rest) or from the store of an earlier run folder (``from_run``; its items are labelled from
that run's own data, and every item here is evaluated). Means are over items (not over class means), so
``baseline`` unset is the mean of every item without the target value. It is added at ``positions`` (``last``,
``audio``, ``text``, ``all``, ``token:i``) at decode steps ``steps``: unset, an edit at ``last`` or ``all`` also
applies to every generated position; ``[1]`` is the prompt pass only. ``control=random`` replaces the vector by a
seeded random direction of the same norm (the control every steering effect should beat).

The resolved vector, its norm and the items it was computed from are saved in the spec in ``run.json``, so a
rerun from that spec adds the same vector to the same evaluation items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Calibration, Edit, Intervention, Requirements
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.sites import check_position
from lalm_probe.core.store import ActivationStore
from lalm_probe.core.view import ModelView


def mean_difference(states: np.ndarray, values: list[str], target: str, baseline: str | None) -> np.ndarray:
    """Mean of the rows whose value is ``target`` minus the mean of those with ``baseline`` (None: all others)."""
    values = np.asarray([str(v) for v in values])
    pos = values == target
    neg = values == baseline if baseline is not None else ~pos
    return (states[pos].mean(0, dtype=np.float64) - states[neg].mean(0, dtype=np.float64)).astype(np.float32)


def random_like(vector: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random direction with the norm of ``vector``."""
    draw = np.random.default_rng(seed).standard_normal(vector.shape)
    return (draw * (np.linalg.norm(vector) / np.linalg.norm(draw))).astype(np.float32)


@dataclass
class Steer(Intervention):
    name: ClassVar[str] = "steer"
    description: ClassVar[str] = ("Add scale x (mean state of items with label=target - of label=baseline or all "
                                  "others) at a site")

    label: str | None = None  # the label key, e.g. language
    target: str | None = None  # the value steered towards
    baseline: str | None = None  # the value steered away from (unset: every other item)
    site: str | None = None  # where the vector is read and added; default the lens stack's middle layer output
    read: str = "last"  # the position the means are taken at
    positions: str = "last"  # where the vector is added
    steps: list[int] | None = None  # decode steps it is added at (unset: every step)
    scale: float = 1.0
    probe_size: int = 20  # items (holding the target or baseline value) the vector is computed from
    split: str = "stratified"  # stratified (seeded, by the label), first (the first items), all (every item; no split)
    split_seed: int = 0
    from_run: str | None = None  # an earlier run folder whose store holds site@read: compute the vector there
    control: str = "none"  # none, or random: a seeded random direction of the same norm
    seed: int = 0  # the random control's seed
    vector: list[float] | None = None  # resolved (or given): what is added, saved with the run
    norm: float | None = None  # resolved: the mean difference's norm
    calibration_items: list[str] | None = None  # resolved: the items the vector came from (not evaluated)

    def __post_init__(self) -> None:
        if self.split not in ("stratified", "first", "all"):
            raise UserError(f"steer: split must be stratified, first or all, not '{self.split}'.")
        if self.control not in ("none", "random"):
            raise UserError(f"steer: control must be 'none' or 'random', not '{self.control}'.")
        check_position(self.read)
        check_position(self.positions)
        if self.vector is None and (self.label is None or self.target is None):
            raise UserError("steer needs label=<key> and target=<value> (e.g. steer:label=language,target=de), or "
                            "a vector.")

    def _site(self, model: ModelView) -> str:
        if self.site is not None:
            model.width(self.site)  # an unknown or out-of-range site is refused here
            return self.site
        if model.lens_stack is None:
            raise UserError(f"steer: '{model.name}' has no LM stack to default to; give site=<stack.layer.out>.")
        return model.layer_site("steer", None, None)

    def _values(self, dataset: Dataset, where: str) -> None:
        """Refuse a missing label or a value no item has."""
        present = sorted({str(v) for v in dataset.label_values(self.label)})
        for value in (self.target, self.baseline):
            if value is not None and value not in present:
                raise UserError(f"steer: no item{where} has {self.label} '{value}' (values: {', '.join(present)}).")
        if self.baseline is None and present == [self.target]:
            raise UserError(f"steer: every item{where} has {self.label} '{self.target}'; nothing to subtract.")

    def check(self, dataset: Dataset, analysis: Analysis) -> None:
        if self.vector is None and self.from_run is None:
            self._values(dataset, "")
        if self.from_run is not None and self.vector is None:
            self._earlier_run()

    # ---- the vector ----------------------------------------------------------------------------------------
    def _earlier_run(self) -> tuple[dict, Path]:
        folder = Path(self.from_run)
        record_path = folder / "run.json"
        if not record_path.is_file():
            raise UserError(f"steer: {folder} is not a run folder (no run.json).")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("status") != "complete" or not record.get("stores"):
            raise UserError(f"steer: {folder} is not a finished run with a store; finish it with `probe run` first.")
        return record, folder

    def _from_run(self, model: ModelView, site: str) -> tuple[np.ndarray, list[str]]:
        """The earlier run's stored states at site@read and its items' labels (from that run's own data)."""
        from lalm_probe.core.data import resolve_dataset
        from lalm_probe.core.registry import discover
        from lalm_probe.core.run import DEFAULT_DATA

        record, folder = self._earlier_run()
        earlier = record["config"]["model"].split(":")[0]
        if earlier != model.name:
            raise UserError(f"steer: {folder} was collected with '{earlier}', not '{model.name}'.")
        stores = record["stores"]
        store = ActivationStore.open(folder / stores.get("baseline", next(iter(stores.values()))))
        key = f"{site}@{self.read}"
        if key not in store.keys():
            raise UserError(f"steer: the store of {folder} holds no '{key}'; it has: "
                            f"{', '.join(sorted(store.keys())[:8])}.")
        data = resolve_dataset(record["config"].get("data") or DEFAULT_DATA, discover().dataset_sources())
        held = store.ids_with([key])
        items = Dataset([it for it in data if it.id in held], name=data.name)
        self._values(items, f" of {folder}")
        ids = [it.id for it in items]
        return np.asarray(store.array(key, ids)[:], dtype=np.float32), [str(v) for v in items.label_values(self.label)]

    def calibration(self, model: ModelView, dataset: Dataset, analysis: Analysis) -> Calibration | None:
        site = self._site(model)
        if self.vector is not None:  # given, or resolved by an earlier calibration (a rerun from run.json)
            if not self.calibration_items:
                return None
            skip = set(self.calibration_items)
            rest = Dataset([it for it in dataset if it.id not in skip], name=dataset.name)
            return Calibration(Dataset([], name="none"), rest, Requirements(sites=[]))
        if self.from_run is not None:
            return Calibration(Dataset([], name="none"), dataset, Requirements(sites=[]))
        self._values(dataset, "")
        if self.split == "all":
            return Calibration(dataset, dataset, Requirements([site], [self.read], [self.label]))
        pool = Dataset([it for it in dataset if str(it.labels[self.label]) == self.target
                        or self.baseline is None or str(it.labels[self.label]) == self.baseline], dataset.name)
        if not 0 < self.probe_size < len(pool):
            raise UserError(f"steer: probe_size={self.probe_size} must be between 1 and {len(pool) - 1} (the items "
                            f"holding {self.label} '{self.target}'" + (f" or '{self.baseline}'" if self.baseline else
                                                                          " and the rest") + f" number {len(pool)}).")
        if self.split == "first":
            probe = pool.subset(range(self.probe_size), f"{dataset.name}-steer")
        else:
            probe, _ = pool.split(self.probe_size, self.split_seed, stratify=self.label)
        chosen = {it.id for it in probe}
        rest = Dataset([it for it in dataset if it.id not in chosen], name=f"{dataset.name}-test")
        return Calibration(probe, rest, Requirements([site], [self.read], [self.label]))

    def calibrate(self, model: ModelView, calibration: Calibration, store: ActivationStore,
                  analysis: Analysis) -> None:
        if self.vector is not None:
            return
        site = self._site(model)
        if self.from_run is not None:
            states, values = self._from_run(model, site)
        else:
            ids = [it.id for it in calibration.items]
            states = np.asarray(store.array(f"{site}@{self.read}", ids)[:], dtype=np.float32)
            values = [str(v) for v in calibration.items.label_values(self.label)]
            if self.split != "all":
                self.calibration_items = ids
        if self.target not in values or (self.baseline is None and set(values) == {self.target}) or (
                self.baseline is not None and self.baseline not in values):
            raise UserError(f"steer: the calibration items lack {self.label} '{self.target}' or its counterpart; "
                            "raise probe_size.")
        vector = mean_difference(states, values, self.target, self.baseline)
        self.norm = float(np.linalg.norm(vector))
        if self.control == "random":
            vector = random_like(vector, self.seed)
        self.vector = vector.tolist()

    def edits(self, model: ModelView) -> list[Edit]:
        site = self._site(model)
        if self.vector is None:
            raise UserError("steer: no vector (its calibration did not run).")
        vector = np.asarray(self.vector, dtype=np.float32)
        if vector.ndim != 1 or len(vector) != model.width(site):
            raise UserError(f"steer: the vector has {vector.size} units but site '{site}' has {model.width(site)}.")
        return [Edit(site=site, op="add", positions=self.positions, value=vector, scale=self.scale, steps=self.steps)]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [Steer]
