"""Interfaces for analysis and intervention plugins.

Both are dataclasses whose fields are their parameters, so a spec given on the command line
(``logitlens:norm=false``) or in a JSON file becomes a typed object that is saved with the run.

An intervention never touches nnsight: it returns declarative :class:`Edit` objects (add a vector, set units,
block attention) that the engine applies inside its one trace per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .edits import Edit

__all__ = ["Analysis", "Edit", "Intervention", "Requirements"]

if TYPE_CHECKING:  # pragma: no cover
    from .data import Dataset
    from .engine import Session
    from .model import Prompt
    from .results import Result
    from .store import ActivationStore


@dataclass
class Requirements:
    """What an analysis needs collected: site patterns, position selectors and label keys."""

    sites: list[str]
    positions: list[str] = field(default_factory=lambda: ["last"])
    labels: list[str] = field(default_factory=list)
    force_target: str | None = None  # label key whose text is forced as the decoded prefix for step:/prefix: reads
    generate: int = 0  # >0: also write the model's outputs (up to this many new tokens) as outputs.jsonl


class Intervention:
    """Base class: a dataclass of parameters plus :meth:`edits`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def prepare(self, session: "Session", dataset: "Dataset", analysis: "Analysis") -> "Dataset":
        """Resolve data-dependent parameters (a layer chosen from scores, medians) before the main run.

        Returns the dataset to evaluate on: an intervention that learns from a probing split returns the rest.
        """
        return dataset

    def edits(self, session: "Session") -> list[Edit]:
        raise NotImplementedError


class Analysis:
    """Base class: a dataclass of options, what to collect, and how to turn stores into a result.

    ``analyze`` gets the store collected without interventions (``baseline``) and, when interventions are
    given, the store collected with them (``intervened``), so every analysis can report both. An analysis that
    asks to generate also gets ``baseline:outputs`` (and ``intervened:outputs``), each an ``OutputStore``.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def prompt(self, session: "Session", item: Any) -> "Prompt":
        """The prompt for one item; by default the model's own default prompt for it."""
        return session.plugin.default_prompt(item)

    def requirements(self, session: "Session", dataset: "Dataset") -> Requirements:
        raise NotImplementedError

    def analyze(self, session: "Session", dataset: "Dataset", stores: dict[str, "ActivationStore"]) -> "Result":
        raise NotImplementedError
