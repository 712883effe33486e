"""Layer enrichment (AudioLens, seed 003, Sec. VI-D): h[l+gap] += scale · h[l] at the last position.

``l`` is given, chosen as the layer of highest information score among *incorrectly* predicted items of a
probing split (the paper: 100 probing / 400 test items; evaluation then runs on the rest), or drawn at random
(the paper's baseline, repeated over seeds). The source state is read in the same forward pass, before the
target layer runs, so it equals the clean state of layer l.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit, Intervention
from lalm_probe.core.registry import hookimpl


@dataclass
class LayerEnrich(Intervention):
    name: ClassVar[str] = "layer-enrich"
    description: ClassVar[str] = "Add scale x the state of layer l to layer l+gap at the last position"

    layer: int | None = None  # None: chosen from information scores on the probing split
    gap: int = 5
    scale: float = 1.0
    select: str = "score"  # score (the paper's method) or random (the paper's baseline)
    seed: int = 0
    probe_size: int = 100  # items in the probing split (taken from the start of the dataset)
    position: str = "last"
    stack: str | None = None

    def _stack(self, session: Any) -> tuple[str, int]:
        stack = self.stack or session.plugin.lens_stack
        if stack not in session.plugin.resolved:
            raise UserError(f"layer-enrich: the model has no stack '{stack}'.")
        n = session.plugin.resolved[stack].num_layers
        if self.gap < 1 or self.gap >= n:
            raise UserError(f"layer-enrich: gap {self.gap} must be between 1 and {n - 1} for a {n}-layer stack.")
        return stack, n

    def prepare(self, session: Any, dataset: Any, analysis: Any) -> Any:
        stack, n = self._stack(session)
        valid = n - self.gap  # l must leave room for l + gap
        if self.layer is not None:
            if not 0 <= self.layer < valid:
                raise UserError(f"layer-enrich: layer {self.layer} is out of range; with gap {self.gap} it must be "
                                f"in 0..{valid - 1}.")
            return dataset
        if self.select == "random":
            self.layer = random.Random(self.seed).randrange(valid)
            return dataset
        if self.select != "score":
            raise UserError("layer-enrich: select must be 'score' or 'random'.")
        if not hasattr(analysis, "lens_tables") or not getattr(analysis, "label", None):
            raise UserError("layer-enrich without a layer picks one from information scores: run it with "
                            "--analysis logitlens:label=<key> (or give layer=<l>).")
        if len(dataset) <= self.probe_size:
            raise UserError(f"layer-enrich needs more than probe_size={self.probe_size} items "
                            f"(the dataset has {len(dataset)}); lower probe_size or give layer=<l>.")
        probe = dataset.subset(range(self.probe_size), name=f"{dataset.name}-probe")
        self.layer = self.choose_layer(session, probe, analysis, valid)
        return dataset.subset(range(self.probe_size, len(dataset)), name=f"{dataset.name}-test")

    def choose_layer(self, session: Any, probe: Any, analysis: Any, valid: int) -> int:
        """The layer of highest information score among incorrectly predicted probing items."""
        import tempfile

        from lalm_probe.core.store import ActivationStore

        req = analysis.requirements(session, probe)
        with tempfile.TemporaryDirectory() as tmp:
            store = ActivationStore(tmp, {"probe": probe.fingerprint()})
            session.collect(probe, req.sites, req.positions, store, prompt_fn=lambda it: analysis.prompt(session, it),
                            description="Probing split")
            tables = analysis.lens_tables(session, probe, store)
        entry = tables["positions"][analysis.positions[0]]["label_probs"]  # (layers, items, |Y|)
        targets = tables["targets"]
        wrong = entry[-1].argmax(-1) != targets
        use = wrong if wrong.any() else np.ones_like(wrong)  # no failures: fall back to every item
        scores = (entry[:, use].argmax(-1) == targets[use][None]).mean(axis=1)
        return int(np.argmax(scores[:valid]))

    def edits(self, session: Any) -> list[Edit]:
        stack, _ = self._stack(session)
        if self.layer is None:
            raise UserError("layer-enrich: no layer chosen (prepare() was not run).")
        return [Edit(site=f"{stack}.{self.layer + self.gap}.out", op="add", positions=self.position,
                     source=f"{stack}.{self.layer}.out@{self.position}", scale=self.scale, steps=[1])]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [LayerEnrich]
