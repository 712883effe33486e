"""Layer enrichment (AudioLens, seed 003, Sec. VI-D, Eq. 5): h[l+gap] += scale · h[l] at the last position.

``l`` is given, or chosen as the paper does: on a probing split (100 items by default), the layer of highest
information score among the items the model gets wrong, after which the run evaluates the rest. The paper's
baseline (``select=random``) draws a random layer *for each item*, from the same split, so method and baseline are
scored on the same evaluation items; it is repeated over seeds 0-4 (the paper's five) unless ``seed`` is given,
each seed a variant of the run (:mod:`lalm_probe.core.sweep`), so the lens reports its accuracy as mean ± std. The
probing split is seeded and stratified by the label (corpora such as SAKURA list items grouped by class; ``split=first``
takes the first items as the paper's release order would). The source state is read in the same forward pass
before the target layer runs, so it is the clean state of layer l; only the prompt pass is edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Calibration, Edit, Intervention, Requirements
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.store import ActivationStore
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses.lens.audiolens import information_scores
from lalm_probe.plugins.analyses.lens.plugin import LogitLens


@dataclass
class LayerEnrich(Intervention):
    name: ClassVar[str] = "layer-enrich"
    description: ClassVar[str] = "Add scale x the state of layer l to layer l+gap at the last position (AudioLens)"

    layer: int | None = None  # None: chosen from information scores on the probing split (or at random per item)
    gap: int = 5
    scale: float = 1.0
    select: str = "score"  # score (the paper's method) or random (the paper's baseline: a random layer per item)
    seed: int = 0  # the random layers' seed (select=random; the paper repeats over five)
    probe_size: int = 100  # items in the probing split
    split: str = "stratified"  # stratified (seeded, by the analysis's label) or first (the first probe_size items)
    split_seed: int = 0  # the probing split's seed: the same for the method and every random repeat
    position: str = "last"
    stack: str | None = None
    random_layers: dict | None = None  # resolved for select=random: item id -> layer (saved with the run)

    @classmethod
    def sweep_defaults(cls, params: dict) -> dict[str, list[int]]:
        """The random baseline is repeated over five seeds (the paper's) unless ``seed`` is given."""
        return {"seed": list(range(5))} if "seed" not in params and "random" in str(params.get("select", "")) else {}

    def __post_init__(self) -> None:
        if self.select not in ("score", "random"):
            raise UserError("layer-enrich: select must be 'score' or 'random'.")
        if self.split not in ("stratified", "first"):
            raise UserError("layer-enrich: split must be 'stratified' or 'first'.")

    def _stack(self, model: ModelView) -> tuple[str, int]:
        stack = model.stack_named("layer-enrich", self.stack)
        n = model.resolved[stack].num_layers
        if self.gap < 1 or self.gap >= n:
            raise UserError(f"layer-enrich: gap {self.gap} must be between 1 and {n - 1} for a {n}-layer stack.")
        if self.layer is not None and not 0 <= self.layer < n - self.gap:
            raise UserError(f"layer-enrich: layer {self.layer} is out of range; with gap {self.gap} it must be in "
                            f"0..{n - self.gap - 1}.")
        return stack, n

    def check(self, dataset: Dataset, analysis: Analysis) -> None:
        if self.layer is None and self.random_layers is None and len(dataset) <= self.probe_size:
            raise UserError(f"layer-enrich needs more than probe_size={self.probe_size} items to keep a probing split "
                            f"apart (the data has {len(dataset)}); lower probe_size or give layer=<l>.")

    def calibration(self, model: ModelView, dataset: Dataset, analysis: Analysis) -> Calibration | None:
        self._stack(model)
        if self.layer is not None or self.random_layers is not None:
            return None  # given, or resolved by an earlier calibration (a rerun from run.json)
        if not isinstance(analysis, LogitLens) or not analysis.label:
            raise UserError("layer-enrich picks its layer from logit-lens information scores on a probing split: "
                            "run it with --analysis logitlens:label=<key> (or give layer=<l>).")
        if len(dataset) <= self.probe_size:
            raise UserError(f"layer-enrich needs more than probe_size={self.probe_size} items to keep a probing split "
                            f"apart (the data has {len(dataset)}); lower probe_size or give layer=<l>.")
        if self.split == "first":
            probe = dataset.subset(range(self.probe_size), f"{dataset.name}-probe")
            rest = dataset.subset(range(self.probe_size, len(dataset)), f"{dataset.name}-test")
        else:
            probe, rest = dataset.split(self.probe_size, self.split_seed, stratify=analysis.label)
        stack, _ = self._stack(model)
        needs = Requirements(sites=[f"{stack}.*.out"], positions=[self.position], labels=[analysis.label])
        return Calibration(probe, rest, needs if self.select == "score" else Requirements(sites=[]))

    def calibrate(self, model: ModelView, calibration: Calibration, store: ActivationStore,
                  analysis: Analysis) -> None:
        stack, n = self._stack(model)
        valid = n - self.gap  # l must leave room for l + gap
        if self.select == "random":
            rng = np.random.default_rng(self.seed)
            self.random_layers = {it.id: int(rng.integers(valid)) for it in calibration.evaluate}
            return
        assert isinstance(analysis, LogitLens)
        _, label_ids, targets = analysis.label_spec(model, calibration.items)
        ids = [it.id for it in calibration.items]
        probs = np.stack([analysis.project(model, store.array(f"{stack}.{layer}.out@{self.position}", ids)[:],
                                           layer, label_ids)[2] for layer in range(n)])  # (layers, items, |Y|)
        wrong = probs[-1].argmax(-1) != targets
        use = wrong if wrong.any() else np.ones_like(wrong)  # no failures: every item
        self.layer = int(np.argmax(information_scores(probs[:, use], targets[use])[:valid]))

    def edits(self, model: ModelView) -> list[Edit]:
        stack, _ = self._stack(model)
        if self.layer is not None:
            chosen = {self.layer: None}
        elif self.random_layers is not None:
            chosen = {}
            for item, layer in self.random_layers.items():
                chosen.setdefault(layer, []).append(item)
        else:
            raise UserError("layer-enrich: no layer chosen (its calibration did not run).")
        return [Edit(site=f"{stack}.{layer + self.gap}.out", op="add", positions=self.position,
                     source=f"{stack}.{layer}.out@{self.position}", scale=self.scale, steps=[1], items=items)
                for layer, items in sorted(chosen.items())]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [LayerEnrich]
