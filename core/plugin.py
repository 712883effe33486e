"""Interfaces for analysis and intervention plugins.

Both are dataclasses whose fields are their parameters, so a spec given on the command line
(``logitlens:norm=false``) or in a JSON file becomes a typed object that is saved with the run.

An analysis is a function of stores: it declares what must be collected (:class:`Requirements`), and turns the
collected :class:`Stores` plus a read-only :class:`~lalm_probe.core.view.ModelView` into a result. It never runs
the model, so ``probe analyze RUN_DIR`` can rerun it from a run folder.

An intervention never touches nnsight: it returns declarative :class:`Edit` objects (add a vector, set units,
block attention) that the engine applies inside its one trace per batch. One that learns from data (a layer chosen
on a probing split, medians, a steering vector) declares a :class:`Calibration`: the run collects it first, into
its own store, and hands it to :meth:`Intervention.calibrate` before any edit is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .edits import Edit

if TYPE_CHECKING:  # pragma: no cover
    from .data import Dataset, Stimulus
    from .model import Prompt
    from .outputs import OutputStore
    from .results import Result
    from .store import ActivationStore
    from .view import ModelView

__all__ = ["Analysis", "Calibration", "Edit", "Intervention", "Reads", "Requirements", "Stores", "VariantRun"]


@dataclass
class Reads:
    """Sites read at positions, for every item or only the listed ones (every position of a few items for a heat
    map: ``Reads(["lm.*.out"], ["all"], items=[...])``)."""

    sites: list[str]
    positions: list[str]
    items: list[str] | None = None


@dataclass
class Requirements:
    """What an analysis needs collected: site patterns and positions, label keys, generation."""

    sites: list[str]
    positions: list[str] = field(default_factory=lambda: ["last"])
    labels: list[str] = field(default_factory=list)
    force_target: str | None = None  # label key whose text is forced as the decoded prefix for step:/prefix: reads
    generate: int = 0  # >0: also write the model's outputs (up to this many new tokens) as outputs.jsonl
    more: list[Reads] = field(default_factory=list)  # further reads, e.g. every position of a few items

    def reads(self) -> list[Reads]:
        return ([Reads(list(self.sites), list(self.positions))] if self.sites else []) + list(self.more)


@dataclass
class VariantRun:
    """What one variant of a sweep collected (:mod:`~lalm_probe.core.sweep`): its name (``scale=0.5, seed=1``),
    the swept values, its activations and outputs."""

    name: str
    params: dict[str, Any]
    store: "ActivationStore | None" = None
    outputs: "OutputStore | None" = None


@dataclass
class Stores:
    """What a run collected: activations and outputs without interventions (``baseline``) and with them
    (``intervened``), or, when intervention parameters are swept, with each setting (``variants``). Under
    ``--no-baseline`` only the intervened ones exist."""

    baseline: "ActivationStore | None" = None
    intervened: "ActivationStore | None" = None
    baseline_outputs: "OutputStore | None" = None
    intervened_outputs: "OutputStore | None" = None
    variants: list[VariantRun] = field(default_factory=list)

    def activations(self) -> list[tuple[str, "ActivationStore"]]:
        """``(name, store)`` for each collected activation store: baseline, intervened, then each variant."""
        return [(n, s) for n, s in (("baseline", self.baseline), ("intervened", self.intervened), *(
            (v.name, v.store) for v in self.variants)) if s is not None]

    def outputs(self) -> list[tuple[str, "OutputStore"]]:
        return [(n, s) for n, s in (("baseline", self.baseline_outputs), ("intervened", self.intervened_outputs), *(
            (v.name, v.outputs) for v in self.variants)) if s is not None]


@dataclass
class Calibration:
    """What an intervention learns from before the run: ``requirements`` collected on ``items`` (with the
    analysis's prompts, or ``prompt``'s), after which the run evaluates ``evaluate`` (the items left once a probing
    split is out)."""

    items: "Dataset"
    evaluate: "Dataset"
    requirements: Requirements
    prompt: "Callable[[Stimulus], Prompt] | None" = None  # e.g. steering prompts read bare, without an instruction


class Intervention:
    """Base class: a dataclass of parameters plus :meth:`edits` (and, when it learns from data, a calibration)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def check(self, dataset: "Dataset", analysis: "Analysis") -> None:
        """Refuse data it cannot use, before the model is loaded (cheap checks only)."""

    def calibration(self, model: "ModelView", dataset: "Dataset", analysis: "Analysis") -> Calibration | None:
        """What to collect before the run to resolve data-dependent parameters; None when nothing is needed."""
        return None

    def calibrate(self, model: "ModelView", calibration: Calibration, store: "ActivationStore",
                  analysis: "Analysis") -> None:
        """Resolve data-dependent parameters from the calibration store (they are saved with the run)."""

    def expand(self, dataset: "Dataset") -> "Dataset":
        """The items the run evaluates, after calibration: by default the dataset itself. A sweep returns copies of
        items, one per condition (with labels naming it), so one run holds every condition. It is a function of
        the resolved spec and the data, so a rerun (``probe analyze``) rebuilds the same copies."""
        return dataset

    def edits(self, model: "ModelView") -> list[Edit]:
        raise NotImplementedError


class Analysis:
    """Base class: a dataclass of options, what to collect, and how to turn stores into a result."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def check(self, dataset: "Dataset") -> None:
        """Refuse data it cannot use (a missing label), before the model is loaded (cheap checks only)."""

    def prompt(self, model: "ModelView", item: Any) -> "Prompt":
        """The prompt for one item; by default the model's own default prompt for it."""
        return model.default_prompt(item)

    def requirements(self, model: "ModelView", dataset: "Dataset") -> Requirements:
        raise NotImplementedError

    def analyze(self, model: "ModelView", dataset: "Dataset", stores: Stores) -> "Result":
        raise NotImplementedError
