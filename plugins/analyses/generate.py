"""The model's own output for every item: the baseline every intervention is compared against.

Writes ``outputs.jsonl`` in the run directory (one ``{"id", "output", ...}`` per line, plus ``language`` for
models that identify it, e.g. Whisper when no language is forced). With ``--intervention`` the intervened outputs
go to ``outputs.jsonl`` and the unedited ones to ``baseline_outputs.jsonl``, and the result says how many
outputs (and detected languages) the intervention changed.

Steering metrics (seed 002 §3.3, App. A.5-A.6, computed as :mod:`.output_metrics` documents): with
``target=<language>``, per run and modality, the script control rate toward the target's script (tokens of the
model's own tokenizer, corpus-weighted), the mean language-ID probability of the target and the share of outputs
identified as it (py3langid, offline); with both modalities, the cross-modal effect ratio CR_T / CR_S of the
intervened run, the source modality being the one the steering units came from (``source``), kept only where
CR_S > ``threshold``. With ``reference=<label>`` (a label holding the gold output text), corpus BLEU and chrF++.
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
from lalm_probe.plugins.analyses.output_metrics import (
    control_rate,
    cross_modal_effect_ratio,
    identify_languages,
    script_of,
    translation_quality,
)
from lalm_probe.plugins.analyses.reps import modality_of


@dataclass
class Generate(Analysis):
    """Greedy outputs per item; language identification accuracy when items carry a language label."""

    name: ClassVar[str] = "generate"
    description: ClassVar[str] = "The model's own output per item (outputs.jsonl); what interventions change"

    max_new_tokens: int = 128
    label: str = "language"  # compared with the model's identified language when both exist
    show: int = 10  # outputs printed per run
    target: str | None = None  # a language (ISO 639-1) steered toward: control rate, language ID, effect ratio
    reference: str | None = None  # a label holding the gold output text: BLEU and chrF++
    source: str = "speech"  # the modality the steering units came from (the effect ratio's denominator)
    threshold: float = 0.10  # the effect ratio is kept only where the source control rate exceeds it
    tokens: str = "model"  # script buckets over the model's tokenizer (the paper's), whitespace or chars

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"generate: max_new_tokens must be at least 1, not {self.max_new_tokens}.")
        if self.tokens not in ("model", "whitespace", "chars"):
            raise UserError("generate: tokens must be model, whitespace or chars.")
        if self.source not in ("speech", "text"):
            raise UserError("generate: source must be speech or text.")
        if self.target is not None:
            script_of(self.target)  # a language with no Latin/CJK script is refused before the model loads
            identify_languages([], [self.target])

    def check(self, dataset: Dataset) -> None:
        if self.reference and not any(it.labels.get(self.reference) for it in dataset):
            raise UserError(f"generate: no item has a '{self.reference}' label to score outputs against.")

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
        if self.target or self.reference:
            result.tables.append(self._metrics(model, dataset, runs))
            if self.target and "intervened" in runs:
                by = {r["modality"]: r["control rate"] for r in result.tables[-1].rows if r["run"] == "intervened"}
                if len(by) == 2:
                    ratio = cross_modal_effect_ratio(by[self.source], by[{"speech": "text", "text": "speech"}[
                        self.source]], threshold=self.threshold)
                    result.summary["cross-modal effect ratio"] = ratio.ratio
                    if ratio.reason:
                        result.notes.append(f"No cross-modal effect ratio: {ratio.reason}.")
        if "intervened" in runs and "baseline" in runs:
            pairs = list(zip(runs["baseline"], runs["intervened"]))
            result.summary["outputs changed by the intervention"] = sum(a["output"] != b["output"] for a, b in pairs)
            if any("language" in a for a, _ in pairs):
                result.summary["languages changed by the intervention"] = sum(
                    a.get("language") != b.get("language") for a, b in pairs)
        return result


    def _metrics(self, model: ModelView, dataset: Dataset, runs: dict[str, list[dict]]) -> Table:
        """Per run and modality: control rate, language ID of the target, BLEU / chrF++ against the references."""
        modality = {it.id: modality_of(it) for it in dataset}
        gold = {it.id: it.labels.get(self.reference) for it in dataset} if self.reference else {}
        tokenizer = model.tokenizer if self.tokens == "model" else None
        split = "whitespace" if self.tokens == "model" else self.tokens
        rows = []
        for name, outputs in runs.items():
            for kind in sorted({modality[r["id"]] for r in outputs}):
                texts = [r["output"] for r in outputs if modality[r["id"]] == kind]
                row = {"run": name, "modality": kind, "outputs": len(texts)}
                if self.target:
                    lid = identify_languages(texts, [self.target])
                    row.update({"control rate": control_rate(texts, script_of(self.target), tokenizer, split),
                                f"P({self.target}) by language ID": lid.mean()[self.target],
                                f"identified as {self.target}": lid.share(self.target)})
                if self.reference:
                    refs = [gold[r["id"]] for r in outputs if modality[r["id"]] == kind]
                    if any(refs):
                        row.update(translation_quality(texts, refs))
                rows.append(row)
        return Table("Steering metrics" + (f" toward {self.target}" if self.target else ""), rows)


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [Generate]
