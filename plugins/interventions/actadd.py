"""Activation addition (ActAdd; Turner et al. 2024, as seed 004 §4 uses it for cross-lingual steering).

A pair of steering prompts (``add`` = "Good", ``sub`` = "Bad") is run through the model; their states at one layer
are subtracted position by position, and ``coeff`` times that difference is added to the steered input at the
same layer, front-aligned: position i of the difference lands on position i of the span it is added to (``at``).
Several pairs are summed, each front-aligned. Choices, with the reference they follow:

- **The prompts' states** are computed by the model itself in a calibration stage: each prompt is a text item read
  bare (no instruction), and its states are those of its own tokens (the ``text`` span, ``all:text``). The
  reference (TransformerLens, montemac/activation_additions) runs ``BOS + prompt``; on a chat-template model the
  template around the prompt is the same for both prompts, so it is left out, as the reference's BOS, whose
  difference is zero.
- **Padding** (``pad=spaces``, the reference's ``tokens_right`` with a space pad, and seed 004's code): the shorter
  prompt is right-padded with spaces until both have as many tokens, then run through the model; a tokenizer that
  merges spaces so the lengths cannot match is refused. ``pad=none``: each prompt's states are used where it has
  positions (the difference is zero-padded), as the reference does without a pad method.
- **Where**: ``at=text`` adds from the first token of the steered item's text (for a speech item, of its
  instruction); ``at=audio`` from the first audio position; ``at=all`` from the first position of the sequence,
  as the reference does. A difference longer than that span is refused (the reference's "more mod tokens than
  prompt tokens" assertion).
- **When**: at the prompt pass only. Later decode steps compute only the new position, which the reference's hook
  skips (``resid_pre.shape[1] == 1``).
- **Layer**: ``layer`` is a site index here: ``<stack>.<layer>.out`` is the output of block layer+1. The
  reference hooks ``blocks.{k}.hook_resid_pre``, the input of block k, which is layer k-1 here (seed 004's layer
  17 on Llama-3 is ``layer=16``). Seed 004 uses ``coeff=5`` (its summary table reports 2; see METHODS §5.3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Analysis, Calibration, Edit, Intervention, Requirements
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.store import ActivationStore
from lalm_probe.core.view import ModelView


def pad_with_spaces(texts: tuple[str, str], count) -> tuple[str, str]:
    """Right-pad the prompt with fewer tokens with spaces until both have as many (``count``: text -> tokens)."""
    lengths = [count(t) for t in texts]
    short, goal = int(np.argmin(lengths)), max(lengths)
    padded = texts[short]
    for _ in range(4 * goal):  # a tokenizer that merges runs of spaces may need several per token
        if count(padded) >= goal:
            break
        padded += " "
    if count(padded) != goal:
        raise UserError(f"actadd: '{texts[short]}' cannot be padded with spaces to the {goal} tokens of "
                        f"'{texts[1 - short]}' (this tokenizer merges spaces); give prompts of equal token length, "
                        "or pad=none.")
    return (padded, texts[1]) if short == 0 else (texts[0], padded)


def _item_id(text: str) -> str:
    return f"actadd:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def front_aligned_difference(adds: list[np.ndarray], subs: list[np.ndarray]) -> np.ndarray:
    """Σ over pairs of (add − sub), each ``(positions, units)`` placed from position 0 (missing positions are 0)."""
    rows = max(len(a) for a in adds + subs)
    out = np.zeros((rows, adds[0].shape[1]), dtype=np.float64)
    for a, s in zip(adds, subs):
        out[: len(a)] += a
        out[: len(s)] -= s
    return out.astype(np.float32)


@dataclass
class ActAdd(Intervention):
    name: ClassVar[str] = "actadd"
    description: ClassVar[str] = ("Add coeff x (states of prompt add - of prompt sub) position by position from the "
                                  "start of the text (ActAdd)")

    add: list[str] = field(default_factory=list)  # steering prompts added (one per pair), e.g. [Good]
    sub: list[str] = field(default_factory=list)  # and subtracted, e.g. [Bad]
    layer: int | None = None  # site index (output of block layer+1); default: the middle layer
    coeff: float = 5.0
    at: str = "text"  # the span whose start the difference is added from: text, audio, or all (the sequence start)
    pad: str = "spaces"  # spaces (the reference) or none
    stack: str | None = None  # default: the model's lens stack (the LM)
    component: str = "out"
    diff: list | None = None  # resolved: the (positions, units) difference, saved with the run

    def __post_init__(self) -> None:
        if not self.add or not self.sub or any(not p.strip() for p in self.add + self.sub):
            raise UserError("actadd: a steering prompt is empty; give one word or phrase for each of add and sub "
                            "(e.g. actadd:add=Good,sub=Bad).")
        if len(self.add) != len(self.sub):
            raise UserError(f"actadd: {len(self.add)} prompts to add and {len(self.sub)} to subtract; give them in "
                            "pairs.")
        if self.pad not in ("spaces", "none"):
            raise UserError(f"actadd: pad must be 'spaces' or 'none', not '{self.pad}'.")

    def site(self, model: ModelView) -> str:
        return model.layer_site("actadd", self.stack, self.layer, self.component)

    def texts(self, model: ModelView) -> list[str]:
        """The steering prompts in the order add, sub, add, sub, ..., padded as the reference pads them."""
        def count(text: str) -> int:
            return len(model.tokenizer(text, add_special_tokens=False)["input_ids"])

        return [t for pair in zip(self.add, self.sub)
                for t in (pad_with_spaces(pair, count) if self.pad == "spaces" else pair)]

    def prompts(self, model: ModelView) -> Dataset:
        """The steering prompts as text items; ids name the text (calibrations share one store, so another prompt
        is another row), and a prompt given twice is one item."""
        items = {_item_id(t): Stimulus(_item_id(t), text=t) for t in self.texts(model)}
        return Dataset(list(items.values()), name="actadd-prompts")

    def calibration(self, model: ModelView, dataset: Dataset, analysis: Analysis) -> Calibration | None:
        site = self.site(model)
        if self.diff is not None:
            return None  # resolved by an earlier calibration (a rerun from run.json)
        if "text" not in model.modalities:
            raise UserError(f"actadd runs its steering prompts through the model as text, and '{model.name}' takes "
                            f"{' and '.join(model.modalities)} input only.")
        return Calibration(self.prompts(model), dataset, Requirements(sites=[site], positions=["all:text"]),
                           prompt=lambda it: Prompt())

    def calibrate(self, model: ModelView, calibration: Calibration, store: ActivationStore,
                  analysis: Analysis) -> None:
        states = store.ragged(f"{self.site(model)}@all:text", [_item_id(t) for t in self.texts(model)])
        adds, subs = states[0::2], states[1::2]
        if self.pad == "spaces":
            for i, (a, s) in enumerate(zip(adds, subs)):
                if len(a) != len(s):
                    raise UserError(f"actadd: after padding, '{self.add[i]}' and '{self.sub[i]}' still read as "
                                    f"{len(a)} and {len(s)} tokens inside the model's prompt; give prompts of equal "
                                    "token length, or pad=none.")
        self.diff = front_aligned_difference(adds, subs).tolist()

    def edits(self, model: ModelView) -> list[Edit]:
        site = self.site(model)
        if self.diff is None:
            raise UserError("actadd: the steering difference was not computed (its calibration did not run).")
        diff = np.asarray(self.diff, dtype=np.float32)
        if diff.ndim != 2 or diff.shape[1] != model.width(site):
            raise UserError(f"actadd: the steering difference has {diff.shape[-1]} units but '{site}' has "
                            f"{model.width(site)}.")
        return [Edit(site=site, op="add", positions=self.at, value=diff, scale=self.coeff, steps=[1])]


@hookimpl
def lalm_probe_interventions() -> list[type]:
    return [ActAdd]
