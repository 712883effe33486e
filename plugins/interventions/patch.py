"""Activation patching (state replacement): the states at chosen sites and positions of a target item are replaced by
the states the same model computes for a source item (clean -> corrupted patching).

Pairs come from ``pairs`` (target id -> source id), from one ``source`` id patched into every other item, or from
a label: ``source_where=language:en`` pairs each item with the item of the same ``pair_by`` value (default
``semantic_id``) whose language is en (among several, the one sharing most other labels, e.g. the same voice;
then the first in the data); ``target_where`` narrows the targets. The source states are read in a calibration
stage (their own forward pass, nothing edited) and written into the targets at the prompt pass.

Positions: ``last`` and ``token:i`` replace one state; a span (``text``, ``audio``) or ``all`` replaces every
position of it, position by position from its start (a source span longer than the target's is refused, so
patch spans of equal length).

``sweep=true`` makes one copy of each target per (site, position), patched there alone, next to the unpatched
originals: one run then holds the whole layer x position effect map, which the ``patching`` analysis reads. The
copies are rebuilt from the spec on every rerun; the source states are not saved in ``run.json`` but read again
(from the calibration store in the run folder), so ``probe analyze`` reruns any analysis on a patched run. With a
sweep, ``--no-baseline`` saves a pass per copy (the originals are the unpatched runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Calibration, Edit, Intervention, Requirements
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.sites import check_position, parse_sites
from lalm_probe.core.steps import step_of
from lalm_probe.core.store import ActivationStore
from lalm_probe.core.view import ModelView

COPY = "~"  # copy ids: <target id>~<site>@<position>


def parse_where(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition(":")
    if not sep or not key or not value:
        raise UserError(f"patch: {what} must look like <label>:<value> (e.g. language:en), not '{text}'.")
    return key, value


def _check_value(dataset: Dataset, key: str, value: str) -> None:
    present = sorted({str(it.labels[key]) for it in dataset if key in it.labels})
    if not present:
        raise UserError(f"patch: no item has a label '{key}'.")
    if value not in present:
        raise UserError(f"patch: no item has {key} '{value}' (values: {', '.join(present)}).")


def label_pairs(dataset: Dataset, pair_by: str, source: tuple[str, str], targets: tuple[str, str] | None
                ) -> dict[str, str]:
    """Target id -> source id: the item of the same ``pair_by`` value holding ``source`` = (label, value); among
    several, the one sharing most other labels with the target, then the first in the data."""
    key, value = source
    groups: dict[str, list[Stimulus]] = {}
    for it in dataset:
        if pair_by in it.labels and str(it.labels.get(key)) == value:
            groups.setdefault(str(it.labels[pair_by]), []).append(it)
    skip = {pair_by, key}
    out = {}
    for it in dataset:
        if str(it.labels.get(key)) == value or pair_by not in it.labels:
            continue
        if targets is not None and str(it.labels.get(targets[0])) != targets[1]:
            continue
        candidates = groups.get(str(it.labels[pair_by]), [])
        if candidates:
            def shared(c: Stimulus) -> int:
                return sum(c.labels.get(k) == v for k, v in it.labels.items() if k not in skip)
            out[it.id] = max(candidates, key=shared).id  # max keeps the first of equals
    return out


def read_selector(position: str) -> str:
    """How a source state is read for a patch position: single positions as they are, spans position by position."""
    if position in ("last", "all") or position.startswith(("token:", "all:")):
        return position
    return f"all:{position}"


@dataclass
class Patch(Intervention):
    name: ClassVar[str] = "patch"
    description: ClassVar[str] = ("Replace states at sites and positions with another item's (activation patching); "
                                  "sweep=true: the layer x position map in one run")

    sites: list[str] | None = None  # site patterns; default: every layer's block output of the lens stack
    positions: list[str] = field(default_factory=lambda: ["last"])
    source: str | None = None  # one item whose states are patched into every other item
    pairs: dict | None = None  # target id -> source id
    pair_by: str = "semantic_id"  # with source_where: the label that pairs items
    source_where: str | None = None  # <label>:<value>: the source of each target, e.g. language:en
    target_where: str | None = None  # <label>:<value>: only these items are patched
    sweep: bool = False  # one copy of each target per (site, position), patched there alone

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.source, self.pairs, self.source_where)]
        if sum(given) != 1:
            raise UserError("patch needs exactly one of source=<item id>, pairs={target: source} or "
                            "source_where=<label>:<value> (e.g. patch:source_where=language:en).")
        for pos in self.positions:
            check_position(pos)
            if pos == "mean" or step_of(pos):
                raise UserError(f"patch: position '{pos}' is not a state to replace; use last, token:<i>, a span "
                                "(text, audio) or all.")
        self._pairs: dict[str, str] | None = None
        self._states: dict[tuple[str, str], dict[str, np.ndarray]] | None = None
        self._copies: dict[tuple[str, str], dict[str, str]] = {}
        self._conditions: list[tuple[str, str]] = []

    # ---- who is patched from whom ----------------------------------------------------------------------------
    def resolve_pairs(self, dataset: Dataset) -> dict[str, str]:
        ids = {it.id for it in dataset}
        targets = parse_where(self.target_where, "target_where") if self.target_where else None
        if targets:
            _check_value(dataset, *targets)
        if self.pairs is not None:
            pairs = {str(t): str(s) for t, s in self.pairs.items()}
        elif self.source is not None:
            pairs = {it.id: self.source for it in dataset if it.id != self.source
                     and (targets is None or str(it.labels.get(targets[0])) == targets[1])}
        else:
            where = parse_where(self.source_where, "source_where")
            _check_value(dataset, *where)
            pairs = label_pairs(dataset, self.pair_by, where, targets)
            if not pairs:
                raise UserError(f"patch: no item has a source (an item of the same {self.pair_by} with "
                                f"{where[0]} '{where[1]}').")
        for target, source in pairs.items():
            if source not in ids:
                raise UserError(f"patch: source item '{source}' is not in the data.")
            if target not in ids:
                raise UserError(f"patch: target item '{target}' is not in the data.")
        return pairs

    def check(self, dataset: Dataset, analysis: Analysis) -> None:
        self.resolve_pairs(dataset)

    def conditions(self, model: ModelView) -> list[tuple[str, str]]:
        """Every (site, position) patched: the sweep's conditions."""
        lens = model.lens_stack
        if self.sites is None and lens is None:
            raise UserError(f"patch: '{model.name}' has no LM stack to default to; give sites=[<stack>.*.out].")
        sites = [str(s) for s in parse_sites(self.sites or [f"{lens}.*.out"], model.resolved)]
        return [(site, pos) for site in sites for pos in self.positions]

    # ---- calibration: the source states --------------------------------------------------------------------
    def calibration(self, model: ModelView, dataset: Dataset, analysis: Analysis) -> Calibration:
        self._pairs = self.resolve_pairs(dataset)
        self._conditions = conditions = self.conditions(model)
        wanted = set(self._pairs.values())
        sources = Dataset([it for it in dataset if it.id in wanted], name=f"{dataset.name}-sources")
        reads = Requirements(sites=sorted({s for s, _ in conditions}),
                             positions=sorted({read_selector(p) for _, p in conditions}))
        return Calibration(sources, dataset, reads)

    def calibrate(self, model: ModelView, calibration: Calibration, store: ActivationStore,
                  analysis: Analysis) -> None:
        ids = [it.id for it in calibration.items]
        states: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for site, pos in self.conditions(model):
            key = f"{site}@{read_selector(pos)}"
            rows = store.ragged(key, ids) if read_selector(pos).startswith("all") else store.array(key, ids)[:]
            states[(site, pos)] = {i: np.asarray(r, dtype=np.float32) for i, r in zip(ids, rows)}
        self._states = states

    def expand(self, dataset: Dataset) -> Dataset:
        if not self.sweep:
            return dataset
        if self._pairs is None or not self._conditions:
            raise UserError("patch: a sweep needs its calibration first (it names the sites to sweep).")
        items, self._copies = list(dataset), {}
        for it in dataset:
            if it.id not in self._pairs:
                continue
            for site, pos in self._conditions:
                parts = site.split(".")
                copy = f"{it.id}{COPY}{site}@{pos}"
                labels: dict[str, Any] = {**it.labels, "patch_of": it.id, "patch_source": self._pairs[it.id],
                                          "patch_site": site, "patch_position": pos,
                                          "patch_layer": int(parts[1]) if len(parts) == 3 else None,
                                          "patch_component": parts[-1]}
                items.append(replace(it, id=copy, labels=labels))
                self._copies.setdefault((site, pos), {})[copy] = self._pairs[it.id]
        return Dataset(items, name=f"{dataset.name}-patched")

    def edits(self, model: ModelView) -> list[Edit]:
        if self._states is None or self._pairs is None:
            raise UserError("patch: the source states were not read (its calibration did not run).")
        out = []
        for site, pos in self.conditions(model):
            sources = self._copies.get((site, pos), {}) if self.sweep else self._pairs
            value = {target: self._states[(site, pos)][source] for target, source in sources.items()}
            if value:
                out.append(Edit(site=site, op="set", positions=pos[4:] if pos.startswith("all:") else pos,
                                value=value, steps=[1]))
        return out


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [Patch]
