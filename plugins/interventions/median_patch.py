"""Median-value neuron patching (seed 002 §3.4): force a language's selected units to their median on positives.

The units are the top-k (or bottom-k, or both) of a target label value in an expertise table, per stack, as the
``neurons`` analysis writes them; each is set to its ``on_p50`` (its median response over the items of that value)
at every position of the input and at every generated position (the released code's forcing: a hook on the module
at every forward call), at all decode steps or the chosen ones. The table comes from an earlier run folder
(``table=<run dir>`` or a ``.csv``), or from a probing split of this run's data (``table`` unset: a calibration
stage collects and ranks it, and the run evaluates the rest). ``control=random`` is the matched control: in every
site, as many units as the selection has there, drawn at random (seeded) and forced to their own medians, so an
effect can be compared with chance. The chosen units and values are saved with the run.
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
from lalm_probe.core.store import ActivationStore
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses.neurons.plugin import Neurons, table_name
from lalm_probe.plugins.analyses.neurons.selection import KINDS, select
from lalm_probe.plugins.analyses.neurons.table import ExpertiseTable, read_csv


@dataclass
class MedianPatch(Intervention):
    name: ClassVar[str] = "median-patch"
    description: ClassVar[str] = "Force a label value's selected units to their median on positives (seed 002)"

    value: str | None = None  # the target label value, e.g. de
    label: str = "language"
    table: str | None = None  # a run folder with a neurons analysis, or an expertise .csv; unset: a probing split
    modality: str = "speech"  # which table: speech, text or joint
    position: str = "step:1"  # which step's table (its decoder position: step:t, prefix:t or last)
    kind: str = "top"  # top, bottom or both
    k: int = 1000  # units per stack
    stacks: list[str] | None = None  # which modules to force (default: every stack of the table)
    steps: list[int] | None = None  # decode steps to force at (default: every step, as the paper does)
    control: str = "none"  # none, or random: as many units per site, drawn at random (seeded)
    seed: int = 0
    probe_size: int = 100  # items of the probing split when the table comes from this run's data
    units: dict | None = None  # resolved: site -> [[unit, value], ...] (saved with the run)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"median-patch: kind must be one of {', '.join(KINDS)}.")
        if self.control not in ("none", "random"):
            raise UserError("median-patch: control must be 'none' or 'random'.")
        if self.modality not in ("speech", "text", "joint"):
            raise UserError("median-patch: modality must be speech, text or joint.")
        kind, _, step = self.position.partition(":")
        if self.position != "last" and not (kind in ("step", "prefix") and step.isdigit() and int(step) >= 1):
            raise UserError(f"median-patch: position must be last, step:<t> or prefix:<t> (t from 1), not "
                            f"'{self.position}'.")
        if self.units is None and not self.value:
            raise UserError(f"median-patch needs value=<the target {self.label}>, e.g. value=de.")

    def check(self, dataset: Dataset, analysis: Analysis) -> None:
        if self.units is None and self.table is None and len(dataset) <= self.probe_size:
            raise UserError(f"median-patch without table= ranks units on a probing split of probe_size="
                            f"{self.probe_size} items, but the data has {len(dataset)}; lower probe_size or pass "
                            "table=<a run folder with a neurons analysis>.")

    # ---- where the table comes from -----------------------------------------------------------------
    def _load(self, model: ModelView) -> ExpertiseTable:
        path = Path(self.table)
        if path.is_dir():
            record = path / "run.json"
            if record.is_file():
                run_model = json.loads(record.read_text())["config"]["model"].split(":")[0]
                if run_model != model.name:
                    raise UserError(f"median-patch: {path} is a run of '{run_model}', not of '{model.name}'; "
                                    "units are only meaningful on the model they were ranked on.")
            found = [p / table_name(self.label, self.value, self.modality, self.position)
                     for p in (path, *sorted((path / "analyses").glob("*")))]
            found = [p for p in found if p.is_file()]
            if not found:
                tables = path.glob(f"**/expertise/{self.label}={self.value}/{self.modality}/*.csv")
                have = sorted({p.stem for p in tables if "." not in p.stem})
                raise UserError(f"median-patch: {path} has no expertise table for {self.label}={self.value}, "
                                f"{self.modality}, {self.position}"
                                + (f"; it has positions {', '.join(have)}." if have else
                                   "; run `probe run ... --analysis neurons` there first."))
            path = found[0]
        elif not path.is_file():
            raise UserError(f"median-patch: table {path} is neither a run folder nor an expertise .csv file.")
        return read_csv(path)

    def calibration(self, model: ModelView, dataset: Dataset, analysis: Analysis) -> Calibration | None:
        if self.units is not None:
            return None  # resolved by an earlier calibration (a rerun from run.json)
        if self.table is not None:
            self._choose(model, self._load(model))
            return None
        probe, rest = dataset.split(self.probe_size, self.seed, stratify=self.label)
        steps = [int(self.position.split(":")[1])] if ":" in self.position else []
        pooling = self.position.split(":")[0] if ":" in self.position else "step"
        self._ranker = Neurons(label=self.label, stacks=self.stacks, steps=steps, pooling=pooling,
                               modality="joint" if self.modality == "joint" else "each", values=[self.value])
        self._ranker.check(probe)
        needs = self._ranker.requirements(model, probe)
        return Calibration(probe, rest, Requirements(sites=[], labels=needs.labels, more=needs.more))

    def calibrate(self, model: ModelView, calibration: Calibration, store: ActivationStore,
                  analysis: Analysis) -> None:
        tables = self._ranker.tables(model, calibration.items, store)
        key = (self.value, self.modality, self.position)
        if key not in tables:
            raise UserError(f"median-patch: the probing split has no {self.modality} items with "
                            f"{self.label}={self.value} and others to rank against at {self.position}.")
        self._choose(model, tables[key])

    def _choose(self, model: ModelView, table: ExpertiseTable) -> None:
        """Resolve the forced units: the selection, or the matched random control, with their medians."""
        unknown = sorted({s for s in set(table.site.tolist()) if not self._site_fits(model, s, table)})
        if unknown:
            raise UserError(f"median-patch: the expertise table's sites do not fit '{model.name}' (e.g. {unknown[0]});"
                            " it comes from another model or site set.")
        rows = np.concatenate(list(select(table, self.k, self.kind, self.stacks).values()))
        if self.control == "random":
            rng = np.random.default_rng(self.seed)
            picked = []
            for site in dict.fromkeys(table.site[rows].tolist()):
                pool = np.flatnonzero(table.site == site)
                picked.append(rng.choice(pool, size=int((table.site[rows] == site).sum()), replace=False))
            rows = np.concatenate(picked)
        units: dict[str, list[list[float]]] = {}
        for r in sorted(rows.tolist(), key=lambda i: (table.site[i], table.unit[i])):
            units.setdefault(str(table.site[r]), []).append([int(table.unit[r]), float(table.on_p50[r])])
        self.units = units

    @staticmethod
    def _site_fits(model: ModelView, site: str, table: ExpertiseTable) -> bool:
        try:
            width = model.width(site)
        except UserError:
            return False
        return int(table.unit[table.site == site].max()) < width

    def edits(self, model: ModelView) -> list[Edit]:
        if self.units is None:
            raise UserError("median-patch: no units chosen (its calibration did not run).")
        return [Edit(site=site, op="set", positions="all", units=[u for u, _ in pairs], value=[v for _, v in pairs],
                     steps=self.steps) for site, pairs in self.units.items()]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [MedianPatch]
