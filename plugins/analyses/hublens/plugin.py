"""Seed 004's logit-lens tests (Wu et al., ICLR 2025), each reported for every store: without and with interventions.

- ``test=anchor`` (Eq. 3, dominant-language anchoring): for each item, per layer, the lens log-probability at
  ``position`` of the first token of its continuation in the dominant language (τ*) against that of the
  continuation in the input language (τ°). The input-language continuation is the item's ``native`` label (or its
  text); the dominant one is a label, or ``parallel:<lang>``: the ``native`` text of the item with the same
  ``semantic_id`` in that language (on Whisper with a forced language, the decoder's last prompt position predicts
  the transcript's first token: is " The" more probable than " Die" in the middle layers of a German clip?). Items
  already in the dominant language are left out. Reports mean log-probabilities with 95% intervals, mean
  probabilities, and the share of items with ``p(τ*) > p(τ°)`` per layer.
- ``test=audio`` (App. C.2): for each item, the words of its ``label`` (split on commas and spaces), the
  log-probability of each word's first token averaged over the ``span`` positions (``audio``), averaged over the
  words, then exponentiated; against a random label of the data sharing no word with it (seeded).
- ``test=yesno`` (§4, audio): with the prompt ``question``, the normalised ``p(yes) / (p(yes) + p(no))`` of the
  first tokens of ``yes`` and ``no`` at ``position``, per layer (the last layer is the model's own output), overall
  and per value of ``group`` (e.g. a mammal label). Run it with ``--intervention unembed-steer:...`` to get
  seed 004's Fig. 12(d) numbers beside the unsteered ones.

The lens skips the final norm by default (``norm=false``, as the reference code; the last layer keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses.hub.measure import mean_ci
from lalm_probe.plugins.analyses.hublens.measure import (
    first_token,
    label_words,
    no_overlap_baselines,
    normalised_yes,
    span_alignment,
)
from lalm_probe.plugins.analyses.hublens.plots import curves

TESTS = ("anchor", "audio", "yesno")
PARALLEL = "parallel:"


def _band(values: np.ndarray) -> np.ndarray:
    """(items, layers) -> (layers, 3): mean and 95% interval per layer, over the finite items."""
    out = []
    for col in np.asarray(values, dtype=np.float64).T:
        col = col[np.isfinite(col)]
        out.append(mean_ci(col) if len(col) else (np.nan, np.nan, np.nan))
    return np.asarray(out)


@dataclass
class HubLens(Analysis):
    name: ClassVar[str] = "hub-lens"
    description: ClassVar[str] = ("Seed 004's lens tests: dominant vs input-language continuation (Eq. 3), audio "
                                  "token-level lens, normalised p(Yes)")

    test: str = "anchor"  # anchor (Eq. 3), audio (App. C.2) or yesno (§4 audio)
    stack: str | None = None  # default: the lens stack
    norm: bool = False  # apply the final norm at every layer (the reference does not)
    position: str = "last"  # anchor, yesno: where the next token is read
    native: str = "transcript"  # anchor: label holding the input-language continuation ('text': the item's text)
    dominant: str = "parallel:en"  # anchor: a label, or parallel:<language> (the parallel item's native text)
    token: str = "best"  # anchor: plain, space (first token of " word") or best (the likelier of the two)
    label: str | None = None  # audio: the label holding the description words
    span: str = "audio"  # audio: the positions averaged over
    seed: int = 0  # audio: the random-label baseline's seed
    question: str = "Is this animal a mammal?"  # yesno: the prompt
    yes: str = "Yes"
    no: str = "No"
    group: str | None = None  # yesno: report per value of this label too
    chunk: int = 16  # items projected at once

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise UserError(f"hub-lens: test must be one of {', '.join(TESTS)}, not '{self.test}'.")
        if self.token not in ("plain", "space", "best"):
            raise UserError(f"hub-lens: token must be plain, space or best, not '{self.token}'.")
        if self.test == "audio" and not self.label:
            raise UserError("hub-lens: test=audio needs label=<key>, the label whose words are scored.")

    def _stack(self, model: ModelView) -> str:
        return model.stack_named("hub-lens", self.stack, unembed=True)

    # ---- inputs ------------------------------------------------------------------------------------------
    def _native(self, item: Stimulus) -> str | None:
        if self.native == "text":
            return item.text
        value = item.labels.get(self.native)
        return None if value is None else str(value)

    def continuations(self, dataset: Dataset) -> tuple[list[Stimulus], list[str], list[str], int]:
        """Items with both continuations, their input-language and dominant-language texts, and how many items
        were already in the dominant language."""
        if not self.dominant.startswith(PARALLEL):
            keep = [it for it in dataset if self._native(it) and self.dominant in it.labels]
            return keep, [self._native(it) for it in keep], [str(it.labels[self.dominant]) for it in keep], 0
        lang = self.dominant[len(PARALLEL):]
        dataset.label_values("language")
        dataset.label_values("semantic_id")
        dominant = {}
        for it in dataset:
            if str(it.labels["language"]) == lang and self._native(it):
                dominant.setdefault(str(it.labels["semantic_id"]), self._native(it))
        keep, own, other = [], [], []
        skipped = 0
        for it in dataset:
            if str(it.labels["language"]) == lang:
                skipped += 1
            elif self._native(it) and str(it.labels["semantic_id"]) in dominant:
                keep.append(it)
                own.append(self._native(it))
                other.append(dominant[str(it.labels["semantic_id"])])
        if not keep:
            raise UserError(f"hub-lens: no item has a parallel item in '{lang}' (same semantic_id) and a "
                            f"'{self.native}' continuation; give dominant=<label> or data with {lang} items.")
        return keep, own, other, skipped

    def check(self, dataset: Dataset) -> None:
        if self.test == "anchor":
            self.continuations(dataset)
        elif self.test == "audio":
            dataset.label_values(self.label)
        elif self.group:
            dataset.label_values(self.group)

    def prompt(self, model: ModelView, item: Stimulus) -> Prompt:
        return Prompt(user=self.question) if self.test == "yesno" else model.default_prompt(item)

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        sites = [f"{self._stack(model)}.*.out"]
        if self.test == "audio":
            return Requirements(sites=sites, positions=[f"all:{self.span}"], labels=[self.label])
        return Requirements(sites=sites, positions=[self.position], labels=[self.group] if self.group else [])

    # ---- computation -----------------------------------------------------------------------------------
    def _logprobs(self, model: ModelView, hidden: np.ndarray, layer: int) -> np.ndarray:
        stack = self._stack(model)
        out = []
        for start in range(0, len(hidden), self.chunk):
            logits = model.lens(np.array(hidden[start:start + self.chunk]), stack, self.norm, layer)
            out.append(torch.log_softmax(logits, -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _layers(self, model: ModelView) -> int:
        return model.resolved[self._stack(model)].num_layers

    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        result = Result(summary={"test": self.test, "stack": self._stack(model), "final_norm_applied": self.norm})
        runs = {name: getattr(self, f"_{self.test}")(model, dataset, store, result, name)
                for name, store in stores.activations()}
        if "baseline" in runs and "intervened" in runs:
            for key, base in runs["baseline"].items():
                result.summary[f"{key} (intervened - baseline)"] = runs["intervened"][key] - base
        return result

    def _anchor(self, model: ModelView, dataset: Dataset, store: Any, result: Result, run: str) -> dict[str, float]:
        items, own, other, skipped = self.continuations(dataset)
        tok = model.tokenizer
        variants = {"plain": [False], "space": [True], "best": [False, True]}[self.token]
        ids_own = [[t for t in (first_token(tok, x, v) for v in variants) if t is not None] for x in own]
        ids_dom = [[t for t in (first_token(tok, x, v) for v in variants) if t is not None] for x in other]
        n_layers, ids = self._layers(model), [it.id for it in items]
        lp_own, lp_dom = np.full((len(ids), n_layers), np.nan), np.full((len(ids), n_layers), np.nan)
        vocab = None
        for layer in range(n_layers):
            lp = self._logprobs(model, store.array(f"{self._stack(model)}.{layer}.out@{self.position}", ids)[:], layer)
            vocab = lp.shape[-1]
            for i in range(len(ids)):
                if ids_own[i] and ids_dom[i]:
                    lp_own[i, layer] = max(lp[i, t] for t in ids_own[i])
                    lp_dom[i, layer] = max(lp[i, t] for t in ids_dom[i])
        same = np.array([set(a) == set(b) or not a or not b for a, b in zip(ids_own, ids_dom)])
        lp_own, lp_dom = lp_own[~same], lp_dom[~same]
        dom_wins = (lp_dom > lp_own).mean(0) if len(lp_own) else np.full(n_layers, np.nan)
        bands = {"dominant (τ*)": _band(lp_dom), "input language (τ°)": _band(lp_own)}
        result.arrays.update({f"{run}/logprob_dominant": lp_dom, f"{run}/logprob_input": lp_own,
                              f"{run}/dominant_wins": dom_wins})
        result.tables.append(Table(f"Eq. 3 per layer ({run}): lens log-probability of the continuation", [
            {"layer": layer, "logp_dominant": bands["dominant (τ*)"][layer, 0],
             "logp_input": bands["input language (τ°)"][layer, 0],
             "p_dominant": float(np.exp(lp_dom[:, layer]).mean()) if len(lp_dom) else np.nan,
             "p_input": float(np.exp(lp_own[:, layer]).mean()) if len(lp_own) else np.nan,
             "dominant_wins": dom_wins[layer]} for layer in range(n_layers)]))
        result.figures[f"anchor_{run}"] = curves(bands, f"Eq. 3: lens log-probability of the continuation ({run})",
                                                 "log p_lens", -np.log(vocab or 1), "uniform")
        result.summary.update({"items compared": int((~same).sum()), "items in the dominant language (left out)":
                               skipped, "items whose continuations share a first token or have none (left out)":
                               int(same.sum())})
        if len(lp_own):
            mid = int(np.nanargmax(dom_wins))
            result.summary[f"most dominant-anchored layer ({run})"] = mid
            result.summary[f"share with p(τ*) > p(τ°) there ({run})"] = float(dom_wins[mid])
        return {"share with p(τ*) > p(τ°), mean over layers": float(np.mean(dom_wins)) if len(lp_own) else np.nan}

    def _audio(self, model: ModelView, dataset: Dataset, store: Any, result: Result, run: str) -> dict[str, float]:
        stack = self._stack(model)
        key = f"all:{self.span}"
        labels = [str(v) for v in dataset.label_values(self.label)]
        random = no_overlap_baselines(labels, self.seed)
        tok = model.tokenizer

        def tokens(label: str) -> list[int]:
            found = [first_token(tok, w, False) for w in label_words(label)]
            return [t for t in found if t is not None]

        ids, n_layers = [it.id for it in dataset], self._layers(model)
        matched, baseline = np.full((len(ids), n_layers), np.nan), np.full((len(ids), n_layers), np.nan)
        for layer in range(n_layers):
            states = store.ragged(f"{stack}.{layer}.out@{key}", ids)
            for i, h in enumerate(states):
                lp = self._logprobs(model, h, layer)
                matched[i, layer] = span_alignment(lp, tokens(labels[i]))
                if random[i] is not None:
                    baseline[i, layer] = span_alignment(lp, tokens(random[i]))
        matched, baseline = np.exp(matched), np.exp(baseline)  # exp after averaging in log space (the reference)
        bands = {"matching label": _band(matched), "random label (no shared word)": _band(baseline)}
        result.arrays.update({f"{run}/matching": matched, f"{run}/random": baseline})
        result.tables.append(Table(f"App. C.2 per layer ({run}): lens probability of the label words over the "
                                   f"'{self.span}' positions (geometric mean)", [
            {"layer": layer, "matching": bands["matching label"][layer, 0],
             "random": bands["random label (no shared word)"][layer, 0],
             "difference": float(np.nanmean(matched[:, layer] - baseline[:, layer]))} for layer in range(n_layers)]))
        result.figures[f"audio_{run}"] = curves(bands, f"Audio positions vs label words ({run})", "p_lens")
        result.summary["items without a label sharing no word (no baseline)"] = int(sum(r is None for r in random))
        return {"matching minus random, mean over layers": float(np.nanmean(matched - baseline))}

    def _yesno(self, model: ModelView, dataset: Dataset, store: Any, result: Result, run: str) -> dict[str, float]:
        stack, tok = self._stack(model), model.tokenizer
        yes, no = first_token(tok, self.yes, False), first_token(tok, self.no, False)
        if yes is None or no is None or yes == no:
            raise UserError(f"hub-lens: '{self.yes}' and '{self.no}' need distinct first tokens.")
        ids, n_layers = [it.id for it in dataset], self._layers(model)
        share = np.zeros((len(ids), n_layers))
        for layer in range(n_layers):
            lp = self._logprobs(model, store.array(f"{stack}.{layer}.out@{self.position}", ids)[:], layer)
            share[:, layer] = normalised_yes(np.exp(lp[:, yes]), np.exp(lp[:, no]))
        result.arrays[f"{run}/normalised_yes"] = share
        groups = {"all": np.ones(len(ids), bool)}
        if self.group:
            values = np.array([str(v) for v in dataset.label_values(self.group)])
            groups.update({f"{self.group}={v}": values == v for v in sorted(set(values))})
        bands = {g: _band(share[m]) for g, m in groups.items()}
        result.tables.append(Table(f"Normalised p({self.yes}) per layer ({run}; the last layer is the model's output)",
                                   [{"layer": layer, **{g: b[layer, 0] for g, b in bands.items()}}
                                    for layer in range(n_layers)]))
        result.figures[f"yesno_{run}"] = curves(bands, f"p({self.yes}) / (p({self.yes}) + p({self.no})) ({run})",
                                                "normalised probability", 0.5, "even")
        out = {}
        for g, b in bands.items():
            result.summary[f"normalised p({self.yes}) at the output, {g} ({run})"] = float(b[-1, 0])
            out[f"normalised p({self.yes}) at the output, {g}"] = float(b[-1, 0])
        return out


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [HubLens]
