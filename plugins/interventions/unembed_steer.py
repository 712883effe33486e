"""Unembedding-difference steering (seed 004 §4, audio and code): add ``strength · (W_U[new] − W_U[old])`` at a
layer, on chosen positions.

``W_U[word]`` is the unembedding row of the word's first token (the reference: ``tokenizer(word,
add_special_tokens=False).input_ids[0]``, no normalisation), read through the model view. ``new`` and ``old`` are
token strings, or ``label:<key>`` for each item's own label value (seed 004's audio experiment steers each animal
sound from its own animal word to one of the other class). Defaults follow that experiment: every audio position,
the prompt pass only. ``layer`` is a site index (``<stack>.<layer>.out`` is the output of block layer+1), which is
pyvene's ``block_output`` of layer ``layer`` in the reference (SALMONN: 13; Llama-2 code: 17).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Calibration, Edit, Intervention, Requirements
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.sites import check_position
from lalm_probe.core.store import ActivationStore
from lalm_probe.core.view import ModelView

LABEL = "label:"


def first_token(tokenizer, word: str) -> int:
    """The id of a word's first token, as the reference takes it (no special tokens added)."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"unembed-steer: '{word}' has no tokens.")
    return int(ids[0])


@dataclass
class UnembedSteer(Intervention):
    name: ClassVar[str] = "unembed-steer"
    description: ClassVar[str] = "Add strength x (W_U[new] - W_U[old]) at a layer (seed 004: steering with words)"

    new: str | None = None  # the token string steered towards, or label:<key>
    old: str | None = None  # the token string steered away from, or label:<key>
    strength: float = 10.0
    layer: int | None = None  # site index; default: the middle layer
    stack: str | None = None  # default: the lens stack
    component: str = "out"
    positions: str = "audio"
    steps: list[int] = field(default_factory=lambda: [1])
    words: dict | None = None  # resolved for label: words: item id -> [old, new], saved with the run

    def __post_init__(self) -> None:
        if not self.new or not self.old:
            raise UserError("unembed-steer needs new=<token string> and old=<token string> (or label:<key>).")
        check_position(self.positions)

    def _labelled(self) -> bool:
        return self.new.startswith(LABEL) or self.old.startswith(LABEL)

    def _site(self, model: ModelView) -> str:
        return model.layer_site("unembed-steer", self.stack, self.layer, self.component, unembed=True)

    def _word(self, spec: str, item) -> str:
        if not spec.startswith(LABEL):
            return spec
        key = spec[len(LABEL):]
        if key not in item.labels:
            raise UserError(f"unembed-steer: item '{item.id}' has no label '{key}'.")
        return str(item.labels[key])

    def check(self, dataset: Dataset, analysis: Analysis) -> None:
        if self._labelled() and self.words is None:
            for it in dataset:
                self._word(self.new, it), self._word(self.old, it)

    def calibration(self, model: ModelView, dataset: Dataset, analysis: Analysis) -> Calibration | None:
        self._site(model)
        if not self._labelled() or self.words is not None:
            return None
        return Calibration(Dataset([], name="none"), dataset, Requirements(sites=[]))

    def calibrate(self, model: ModelView, calibration: Calibration, store: ActivationStore,
                  analysis: Analysis) -> None:
        self.words = {it.id: [self._word(self.old, it), self._word(self.new, it)] for it in calibration.evaluate}

    def vector(self, model: ModelView, old: str, new: str) -> np.ndarray:
        """``W_U[first token of new] − W_U[first token of old]`` (unscaled)."""
        stack = self._site(model).split(".")[0]
        rows = model.unembedding([first_token(model.tokenizer, old), first_token(model.tokenizer, new)], stack)
        return rows[1] - rows[0]

    def edits(self, model: ModelView) -> list[Edit]:
        site = self._site(model)
        if self._labelled():
            if self.words is None:
                raise UserError("unembed-steer: the words of each item were not resolved (its calibration did not "
                                "run).")
            vectors: dict[tuple[str, str], np.ndarray] = {}
            value = {item: vectors.setdefault((old, new), self.vector(model, old, new))
                     for item, (old, new) in self.words.items()}
        else:
            value = self.vector(model, self.old, self.new)
        return [Edit(site=site, op="add", positions=self.positions, value=value, scale=self.strength,
                     steps=self.steps)]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [UnembedSteer]
