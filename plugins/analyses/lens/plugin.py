"""Logit lens (AudioLens, seed 003; semantic hub, seed 004): vocabulary projections per layer, from the store.

Each layer's output at chosen positions is projected to the vocabulary, with the final norm (AudioLens, via
Patchscopes: ``softmax(W_U · norm(h))``) or without it (semantic hub: ``softmax(W_U · h)``; the last layer keeps
the norm, as the model's own output does). With labelled data it reports AudioLens' information score per layer
(Eq. 2), the critical layer (Eq. 3-4), accuracy (= I at the last layer), the split into correctly and incorrectly
predicted items, the comparison of positions, a per-label breakdown with the confusions, and whether the scores
beat chance (a binomial test). Layers are site indices (0-based). Heat maps come from every position of the first
items, collected like everything else, so the analysis never runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import find
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Analysis, Reads, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.sweep import sweep_table
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses.lens.audiolens import (
    ATTRIBUTES,
    above_chance,
    attribute_prompt,
    confusion,
    critical_layer,
    information_scores,
    label_token_ids,
)
from lalm_probe.plugins.analyses.lens.plots import heatmap, score_plot

MAX_POSITIONS = 16  # heat maps show the last positions of the prompt, where the answer is formed


@dataclass
class LogitLens(Analysis):
    """Vocabulary projection per layer; information score and critical layer with labelled data."""

    name: ClassVar[str] = "logitlens"
    description: ClassVar[str] = "Logit lens per layer/position; AudioLens information score and critical layer"

    stack: str | None = None  # default: the model's lens stack (the LM / text decoder)
    norm: bool = True  # apply the final norm (AudioLens); false reproduces the semantic-hub lens
    positions: list[str] | None = None  # default: last, and the penultimate (token:-2) on an LM reading the prompt
    top_k: int = 5
    label: str | None = None  # the label key holding the attribute (e.g. gender)
    attribute: str | None = None  # gender|language|emotion|animal: use the AudioLens prompts and label set
    prompt_format: str = "direct"  # direct (P1), qa (P2) or mc (P3)
    words: dict | None = None  # label value -> word whose first token is scored (default: the value itself)
    choices: str = "data"  # the label set: the values in the data, or every value the model spells ("model": all
    # 99 of Whisper's languages, its own language-ID rule)
    token: str = "plain"  # plain: first token of the bare word (AudioLens code); space: of " word"
    alpha: float = 0.2
    heatmap_items: int = 1  # layer x position heat maps for the first N items
    chunk: int = 64  # items projected at once (bounds memory for large vocabularies)

    def __post_init__(self) -> None:
        if self.attribute and self.attribute not in ATTRIBUTES:
            raise UserError(f"logitlens: unknown attribute '{self.attribute}'; AudioLens label sets exist for "
                            f"{', '.join(ATTRIBUTES)} (for any other label pass label=<key>).")
        if self.attribute and not self.label:
            self.label = self.attribute
        if self.token not in ("plain", "space"):
            raise UserError("logitlens: token must be 'plain' or 'space'.")
        if self.choices not in ("data", "model") or (self.choices == "model" and self.attribute):
            raise UserError("logitlens: choices must be 'data' or 'model' (the latter with label=, not attribute=).")

    # ---- set-up ------------------------------------------------------------------------------------
    def _stack(self, model: ModelView) -> str:
        return model.stack_named("logitlens", self.stack, unembed=True)

    def _positions(self, model: ModelView) -> list[str]:
        """``last``, plus the penultimate token where the lens stack is an LM reading the prompt (AudioLens' two
        positions); an encoder-decoder's decoder reads only a control prompt, often a single token."""
        if self.positions:
            return list(self.positions)
        reads_prompt = "text" in model.modalities and "cross" not in model.resolved[self._stack(model)].paths
        return ["last", "token:-2"] if reads_prompt else ["last"]

    def label_set(self, dataset: Dataset, model_words: dict[str, str] | None = None) -> tuple[list[Any], list[str]]:
        """Label values Y (the AudioLens set for a known attribute, else the values in the data) and their words.

        A word is taken from ``words``, else from how the model spells the label (``model_words``: Whisper's
        ``<|de|>`` for language ``de``), else it is the value itself.
        """
        present = sorted({str(v) for v in dataset.label_values(self.label)})
        if len(present) < 2 and not self.attribute:
            raise UserError(f"logitlens: label '{self.label}' has {len(present)} value(s) in the data "
                            f"({', '.join(present)}); scoring needs at least two.")
        if self.attribute:
            canonical = ATTRIBUTES[self.attribute]["labels"]
            unknown = [v for v in present if self._canonical(v, canonical) is None and v not in (self.words or {})]
            if unknown:
                raise UserError(f"Labels {unknown} are not in the AudioLens '{self.attribute}' set {canonical}; "
                                "map them with words={...}.")
            ys = canonical
        elif self.choices == "model" and model_words is not None:
            unknown = [v for v in present if v not in model_words]
            if unknown:
                raise UserError(f"logitlens: the model spells no '{self.label}' value {unknown[0]}; choices=model "
                                f"scores among {len(model_words)} values ({', '.join(list(model_words)[:8])}, ...).")
            ys = sorted(model_words)
        else:
            ys = present
        lookup = {**(model_words or {}), **(self.words or {})}
        return ys, [str(lookup.get(y, y)) for y in ys]

    def _canonical(self, value: str, canonical: list[str]) -> str | None:
        """The AudioLens label a value stands for, case-insensitively; a language also by any code or name
        the language table knows (``de``, ``deu``, ``German`` -> ``German``)."""
        if self.attribute == "language" and (lang := find(value)) is not None:
            value = lang.name
        return {c.lower(): c for c in canonical}.get(value.lower())

    def _targets(self, dataset: Dataset, ys: list[str]) -> np.ndarray:
        index = {y.lower(): i for i, y in enumerate(ys)}
        return np.array([index[(self._canonical(str(v), ys) or str(v)).lower()]
                         for v in dataset.label_values(self.label)])

    def check(self, dataset: Dataset) -> None:
        if self.label:
            self.label_set(dataset)  # every item labelled, and the values scorable

    def prompt(self, model: ModelView, item: Stimulus) -> Prompt:
        if not self.attribute:
            return model.default_prompt(item)
        return attribute_prompt(self.attribute, self.prompt_format, ATTRIBUTES[self.attribute]["labels"])

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        sites = [f"{self._stack(model)}.*.out"]
        more = [Reads(sites, ["all"], items=[it.id for it in list(dataset)[: self.heatmap_items]])]
        return Requirements(sites=sites, positions=self._positions(model), labels=[self.label] if self.label else [],
                            more=more if self.heatmap_items else [])

    # ---- computation -------------------------------------------------------------------------------
    def project(self, model: ModelView, hidden: np.ndarray, layer: int, label_ids: list[int] | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Top-k token ids and probabilities, and the label-token probabilities, for (items, d) states."""
        ids, probs, labels = [], [], []
        for start in range(0, len(hidden), self.chunk):
            p = torch.softmax(model.lens(hidden[start:start + self.chunk], self._stack(model), self.norm, layer), -1)
            top = p.topk(min(self.top_k, p.shape[-1]), dim=-1)
            ids.append(top.indices.cpu().numpy())
            probs.append(top.values.cpu().numpy())
            if label_ids is not None:
                labels.append(p[:, label_ids].cpu().numpy())
        return np.concatenate(ids), np.concatenate(probs), (np.concatenate(labels) if labels else None)

    def label_spec(self, model: ModelView, dataset: Dataset) -> tuple[list[Any], list[int], np.ndarray]:
        """Label values, their token ids and each item's target index."""
        spelled = None if self.attribute else model.label_words(self.label)
        if self.choices == "model" and spelled is None:
            raise UserError(f"logitlens: '{model.name}' has no own spelling of '{self.label}' values, so "
                            "choices=model has no label set; use choices=data.")
        ys, words = self.label_set(dataset, spelled)
        return ys, label_token_ids(model.tokenizer, words, self.token == "space"), self._targets(dataset, ys)

    def lens_tables(self, model: ModelView, dataset: Dataset, store: Any) -> dict[str, Any]:
        """Everything per position: top-k arrays and label probabilities ``(layers, items, |Y|)``."""
        stack = self._stack(model)
        n_layers = model.resolved[stack].num_layers
        ids = [it.id for it in dataset]
        ys, label_ids, targets = self.label_spec(model, dataset) if self.label else (None, None, None)
        out: dict[str, Any] = {"labels": ys, "targets": targets, "positions": {}}
        for pos in self._positions(model):
            per = [self.project(model, store.array(f"{stack}.{layer}.out@{pos}", ids)[:], layer, label_ids)
                   for layer in range(n_layers)]
            entry = {"top_ids": np.stack([p[0] for p in per], 1), "top_probs": np.stack([p[1] for p in per], 1)}
            if label_ids is not None:
                entry["label_probs"] = np.stack([p[2] for p in per])
            out["positions"][pos] = entry
        return out

    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        stack = self._stack(model)
        result = Result(summary={"stack": stack, "final_norm_applied": self.norm, "items": len(dataset)})
        variants = {v.name for v in stores.variants}  # a sweep's settings: scored at the last layer only
        full = [(name, store) for name, store in stores.activations() if name not in variants]
        runs = {name: self.lens_tables(model, dataset, store) for name, store in full}
        first = self._positions(model)[0]
        if runs:
            top = next(iter(runs.values()))["positions"][first]
            result.tables.append(Table(f"Top-{self.top_k} lens tokens per layer for '{dataset[0].id}' @{first}", [
                {"layer": layer, "tokens": model.decode_tokens(top["top_ids"][0, layer]),
                 "probs": [float(p) for p in top["top_probs"][0, layer]]}
                for layer in range(top["top_ids"].shape[1])]))
        for name, run in runs.items():
            for pos, entry in run["positions"].items():
                for what in ("top_ids", "top_probs", "label_probs"):
                    if what in entry:
                        result.arrays[f"{name}/{pos}/{what}"] = entry[what]
        result.arrays["item_ids"] = np.array([it.id for it in dataset])
        if self.label and runs:
            self._scores(result, runs, first)
        if self.label and stores.variants:
            self._sweep(result, model, dataset, stores, first)
        for name, store in full:
            for it in list(dataset)[: self.heatmap_items]:
                result.figures[f"heatmap_{name}_{_safe(it.id)}"] = self._heatmap(model, store, stack, it.id)
        return result

    def _sweep(self, result: Result, model: ModelView, dataset: Dataset, stores: Stores, first: str) -> None:
        """Accuracy (= the information score at the last layer) of every variant of a sweep: AudioLens Fig. 5,
        accuracy over λ for the method and for random layers (mean ± std over seeds)."""
        stack = self._stack(model)
        last = model.resolved[stack].num_layers - 1
        _, label_ids, targets = self.label_spec(model, dataset)
        ids = [it.id for it in dataset]
        accuracy = {}
        for v in stores.variants:
            if v.store is not None:
                probs = self.project(model, v.store.array(f"{stack}.{last}.out@{first}", ids)[:], last, label_ids)[2]
                accuracy[v.name] = float((probs.argmax(-1) == targets).mean())
        reference = result.summary.get(f"accuracy (baseline @{first})")
        tables, figure = sweep_table(accuracy, stores.variants, "accuracy", reference)
        result.tables += tables
        if figure is not None:
            result.figures["sweep_accuracy"] = figure
        result.arrays["sweep/accuracy"] = np.array([accuracy.get(v.name, np.nan) for v in stores.variants])
        result.arrays["sweep/variants"] = np.array([v.name for v in stores.variants])
        result.notes.append(f"Sweep: {len(stores.variants)} variants, each scored by its accuracy at the last layer "
                            f"@{first} on the same {len(ids)} evaluation items.")

    def _heatmap(self, model: ModelView, store: Any, stack: str, item: str) -> Any:
        n_layers = model.resolved[stack].num_layers
        states = [store.ragged(f"{stack}.{layer}.out@all", [item])[0] for layer in range(n_layers)]
        probs, tokens = [], []
        for layer, h in enumerate(states):
            best = torch.softmax(model.lens(h[-MAX_POSITIONS:], stack, self.norm, layer), -1).max(-1)
            probs.append(best.values.cpu().numpy())
            tokens.append(model.decode_tokens(best.indices.cpu().numpy()))
        return heatmap(np.stack(probs), tokens, len(states[0]), f"Logit lens top-1 per layer and position: {item}")

    def _scores(self, result: Result, runs: dict[str, Any], first: str) -> None:
        base = next(iter(runs.values()))
        ys, targets = base["labels"], base["targets"]
        n = len(ys)
        final_pred = base["positions"][first]["label_probs"][-1].argmax(-1)
        correct = final_pred == targets
        rows = []
        for name, run in runs.items():
            for pos, entry in run["positions"].items():
                lp = entry["label_probs"]
                curves = {"all": information_scores(lp, targets),
                          "correct": information_scores(lp[:, correct], targets[correct]),
                          "incorrect": information_scores(lp[:, ~correct], targets[~correct])}
                for subset, scores in curves.items():
                    result.arrays[f"{name}/{pos}/information_score/{subset}"] = scores
                tag = f"{name} @{pos}"
                result.summary[f"critical_layer ({tag})"] = critical_layer(curves["all"], n, self.alpha)
                result.summary[f"accuracy ({tag})"] = float(curves["all"][-1])
                rows += [{"run": name, "position": pos, "layer": layer, "I_all": curves["all"][layer],
                          "I_correct": curves["correct"][layer], "I_incorrect": curves["incorrect"][layer]}
                         for layer in range(lp.shape[0])]
                result.figures[f"information_score_{name}_{pos.replace(':', '')}"] = score_plot(
                    curves, n, self.alpha, f"{self.label}: information score per layer ({tag})")
        result.summary.update({"labels": ys, "chance": 1 / n, "correct / incorrect items":
                               f"{int(correct.sum())} / {int((~correct).sum())}"})
        result.notes.append("critical layer (Eq. 3-4): the score-weighted mean layer, in site indices from 0 (the "
                            "paper counts from 1: add 1). It is a mean over layers, hence fractional; NaN means no "
                            f"layer cleared (1+alpha)/|Y| = {(1 + self.alpha) / n:.3f}.")
        result.tables.append(Table("Information score per layer", rows))
        for k, (name, run) in enumerate(runs.items()):  # the chance test and the confusion of every run
            self._chance(result, run["positions"][first]["label_probs"], targets, ys, first, name, k == 0)

    def _chance(self, result: Result, label_probs: np.ndarray, targets: np.ndarray, ys: list[str], first: str,
                run: str, main: bool) -> None:
        """Whether any layer reads the label above chance (binomial, Bonferroni over layers), the tool's one-line
        summary, and the last layer's per-label table of one run; the ``main`` (first) run's keys carry no name."""
        n = len(ys)
        curve = information_scores(label_probs, targets)
        peak = int(np.nanargmax(curve))
        p_peak = above_chance(round(curve[peak] * len(targets)), len(targets), n, tests=len(curve))
        tag = "" if main else f" ({run})"
        result.summary[f"p_above_chance{tag} (peak layer, Bonferroni over layers)"] = p_peak
        if p_peak < 0.05:
            reached = int(np.argmax(curve >= 0.9 * curve[peak]))
            line = (f"'{self.label}' is read off the lens at {first} above chance (p = {p_peak:.2g}); the information "
                    f"score peaks at {curve[peak]:.0%} at layer {peak} and first reaches 90% of that at layer "
                    f"{reached} (layers 0..{len(curve) - 1}); accuracy at the last layer {curve[-1]:.0%}, chance "
                    f"{1 / n:.0%}.")
        else:
            line = (f"No layer reads '{self.label}' above chance ({1 / n:.0%}; best {curve[peak]:.0%} at layer {peak}, "
                    f"p = {p_peak:.2g}): nothing to report.")
        result.summary[f"summary{tag} (the tool's, not a paper metric)"] = line
        pred = label_probs[-1].argmax(-1)
        result.arrays["confusion" if main else f"{run}/confusion"] = conf = confusion(targets, pred, n)
        result.tables.append(Table(f"Per label at the last layer @{first} ({run}) (rows: true label)", [
            {"label": y, "items": int(conf[i].sum()), "accuracy": conf[i, i] / conf[i].sum() if conf[i].sum() else None,
             "read as": ", ".join(f"{ys[j]} {conf[i, j]}" for j in np.argsort(-conf[i]) if conf[i, j] and j != i)}
            for i, y in enumerate(ys) if conf[i].sum() or conf[:, i].sum()]))


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [LogitLens]
