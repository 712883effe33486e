"""The model's own output for every item: the baseline every intervention is compared against.

Writes ``outputs.jsonl`` in the run directory (one ``{"id", "output", ...}`` per line, plus ``language`` for
models that identify it, e.g. Whisper when no language is forced). With ``--intervention`` the intervened outputs
go to ``outputs.jsonl`` and the unedited ones to ``baseline_outputs.jsonl``, and the result says how many
outputs (and detected languages) the intervention changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.view import ModelView


@dataclass
class Generate(Analysis):
    """Greedy outputs per item; language identification accuracy when items carry a language label."""

    name: ClassVar[str] = "generate"
    description: ClassVar[str] = "The model's own output per item (outputs.jsonl); what interventions change"

    max_new_tokens: int = 128
    label: str = "language"  # compared with the model's identified language when both exist
    show: int = 10  # outputs printed per run

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"generate: max_new_tokens must be at least 1, not {self.max_new_tokens}.")

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        return Requirements(sites=[], generate=self.max_new_tokens)

    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        ids = [it.id for it in dataset]
        runs = {name: store.load(order=ids) for name, store in stores.outputs()}
        labels = {it.id: it.labels.get(self.label) for it in dataset}
        result = Result(summary={"items": len(ids)})
        for name, rows in runs.items():
            words = [len(r["output"].split()) for r in rows]
            result.summary[f"mean words ({name})"] = sum(words) / max(1, len(words))
            result.summary[f"empty outputs ({name})"] = sum(1 for r in rows if not r["output"])
            langs = [r["language"] for r in rows if "language" in r]
            if langs:
                result.summary[f"languages ({name})"] = dict(Counter(langs).most_common())
                scored = [(r["language"], str(labels[r["id"]])) for r in rows
                          if r.get("language_detected") and labels[r["id"]] is not None]
                if scored:
                    result.summary[f"language identification accuracy ({name})"] = (
                        sum(a == b for a, b in scored) / len(scored))
            result.tables.append(Table(f"Outputs ({name}, first {self.show})", [
                {"id": r["id"], self.label: labels[r["id"]], **{k: v for k, v in r.items() if k != "id"}}
                for r in rows[: self.show]]))
        if "intervened" in runs and "baseline" in runs:
            pairs = list(zip(runs["baseline"], runs["intervened"]))
            result.summary["outputs changed by the intervention"] = sum(a["output"] != b["output"] for a, b in pairs)
            if any("language" in a for a, _ in pairs):
                result.summary["languages changed by the intervention"] = sum(
                    a.get("language") != b.get("language") for a, b in pairs)
        return result


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Generate]
