"""SVCCA between parallel representations (Lee et al., NAACL 2025 = seed 001; Raghu et al. 2017).

Two sets of vectors for the *same* items (paired by ``semantic_id``) are compared layer by layer: speech vs
text of one language (cross-modal) and language A vs language B within a modality (cross-lingual).

Algorithm (google/svcca ``cca_core`` + its SVCCA tutorial, re-implemented):

1. SVD step: centre each neuron over items, SVD, keep the smallest k whose share of the variance
   ``cumsum(s²)/sum(s²)`` reaches ``variance`` (0.9 as in the paper). Variance means s² (eigenvalues of the
   covariance), not s as the tutorial's printout suggests. k is capped below the number of items and reported
   (``k_*`` columns, and its range in the summary).
2. CCA as in ``cca_core``: covariances, each side rescaled by its largest absolute covariance entry, neurons with
   (rescaled) variance < epsilon dropped, ``Σ + epsilon·I`` (epsilon = 1e-10), inverse square roots from ``eigh``
   (pseudo-inverse cut-off), singular values of ``Σxx^-1/2 Σxy Σyy^-1/2`` = the canonical correlations.
3. Similarity = the PLAIN mean of all min(kx, ky) canonical correlations, as the tutorial and the paper report
   it — not ``cca_core``'s ``"mean"``, which averages only the coefficients up to a 0.98 cumulative threshold.

Random baseline: the same pipeline on non-parallel pairs — the pairing of one side is shuffled — averaged over
``baseline_permutations`` permutations. Shuffling rows does not change either side's SVD or covariance, only
Σxy, so the baseline reuses the whitened data and costs one small SVD per permutation. With few items CCA
overfits (n ≈ k gives correlations near 1 for anything), so the baseline belongs next to every score.

A model that takes speech only (Whisper) has no text encoder, so there is no text side: ``compare=[modality]``
alone is refused before any collection, and beside ``language`` the cross-modal part is skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table
from lalm_probe.core.threads import capped
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses import reps
from lalm_probe.plugins.analyses.svcca.measure import (
    EPSILON,
    SVCCA,
    svcca_reduced,
    svd_reduce,
    whiten,
)
from lalm_probe.plugins.analyses.svcca.plots import curve_plot, heatmaps


# ---- the plugin ------------------------------------------------------------------------------------------
@dataclass
class SVCCAAnalysis(Analysis):
    """SVCCA per layer: speech vs text per language, and language x language per modality, with baselines."""

    name: ClassVar[str] = "svcca"
    description: ClassVar[str] = "SVCCA across modalities and languages per layer, with a shuffled-pairs baseline"

    stack: str | None = None  # one stack for both sides (default: the lens stack, else the first)
    stacks: list[str] | None = None  # [speech_stack, text_stack] for encoder-decoder models
    site: str = "out"
    position: str = "mean"  # seed 001 mean-pools over the sequence; "last" also works
    variance: float = 0.9  # share of s² kept by the SVD step
    epsilon: float = EPSILON
    baseline_permutations: int = 5
    seed: int = 0
    compare: list[str] = field(default_factory=lambda: ["modality", "language"])
    languages: list[str] | None = None  # restrict to these languages
    min_items: int = 5  # fewer paired items than this: the comparison is skipped with a note
    heatmap_layers: list[int] | None = None  # default first / middle / last

    def __post_init__(self) -> None:
        if not 0 < self.variance <= 1:
            raise UserError(f"svcca: variance must be in (0, 1], got {self.variance}.")
        if self.stacks is not None and len(self.stacks) != 2:
            raise UserError("svcca: stacks takes two names, the speech side then the text side, "
                            "e.g. stacks=[speech_encoder,text_encoder].")
        bad = set(self.compare) - {"modality", "language"}
        if bad or not self.compare:
            raise UserError(f"svcca: compare takes 'modality' and/or 'language', got {self.compare}.")
        if self.baseline_permutations < 0 or self.min_items < 3:
            raise UserError("svcca: baseline_permutations must be >= 0 and min_items >= 3.")

    def _stacks(self, model: ModelView) -> dict[str, str]:
        if self.stacks:
            return {"speech": reps.resolve_stack(model, self.stacks[0]),
                    "text": reps.resolve_stack(model, self.stacks[1])}
        one = reps.resolve_stack(model, self.stack)
        return {"speech": one, "text": one}

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        stacks = self._stacks(model)
        for name in stacks.values():
            if reps.site_pattern(model, name, self.site) != f"{name}.*.{self.site}":
                raise UserError(f"svcca compares layers; '{self.site}' is a stack-level extra of '{name}'.")
            reps.layer_sites(model, name, self.site)
        if self.compare == ["modality"]:
            problem = reps.text_side_missing(model, dataset)
            if problem:
                raise UserError(f"svcca: cross-modal SVCCA compares the speech and the text of the same sentences, "
                                f"but {problem}. Use compare=[language] for cross-lingual SVCCA (speech vs "
                                "speech, per layer).")
        sites = list(dict.fromkeys(f"{s}.*.{self.site}" for s in stacks.values()))
        return Requirements(sites=sites, positions=[self.position], labels=["semantic_id", "language"])

    @capped
    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        stacks = self._stacks(model)
        depth = {m: model.resolved[s].num_layers for m, s in stacks.items()}
        result = Result(summary={"stacks": dict(stacks), "position": self.position, "variance (s²)": self.variance,
                                 "baseline permutations": self.baseline_permutations})
        text_problem = reps.text_side_missing(model, dataset) if "modality" in self.compare else None
        if text_problem:
            result.notes.append(f"Cross-modal SVCCA (speech vs text) skipped: {text_problem}."
                                + (" Only cross-lingual (speech vs speech) SVCCA is computed."
                                   if "language" in self.compare else ""))
        for run, store in stores.activations():
            items = self._reaching(dataset, store, stacks, result.notes if run == "baseline" else None)
            index, dropped = reps.parallel_index(items)
            if self.languages:
                index = {k: v for k, v in index.items() if k[0] in set(self.languages)}
            if not index:
                raise UserError("svcca needs items labelled with semantic_id and language.")
            if dropped and run == "baseline":
                result.notes.append(f"{dropped} repeated items (same sentence, language and modality, e.g. other "
                                    "voices) were left out; the first of each stands for the sentence.")
            reader = _Reader(store, [it.id for it in items], stacks, self.site, self.position, self.variance,
                             self.epsilon)
            found = 0
            if "modality" in self.compare and not text_problem:
                found += self._cross_modal(result, run, index, reader, depth)
            if "language" in self.compare:
                found += self._cross_lingual(result, run, index, reader, depth)
            if run == "baseline" and reader.ks:
                result.summary["SVD step: k kept (min, max)"] = [min(reader.ks), max(reader.ks)]
                fewest = min(len(ids) for ids in reader.compared)
                if max(reader.ks) >= fewest / 2:
                    result.notes.append(f"Few items for CCA: up to {max(reader.ks)} SVD directions kept for as few "
                                        f"as {fewest} paired items, so canonical correlations are high for any "
                                        "pairing; read each score against its baseline, or add sentences.")
            if not found:
                raise UserError("svcca found no pair of groups sharing at least "
                                f"{self.min_items} semantic ids (speech and text of one language, or two "
                                "languages of one modality); check the semantic_id labels or lower min_items.")
        result.notes.append("SVCCA = plain mean of all canonical correlations (not cca_core's 0.98-threshold "
                            "'mean'); baseline = same pipeline with one side's pairing shuffled.")
        return result

    def _reaching(self, dataset: Dataset, store: Any, stacks: dict[str, str], notes: list[str] | None) -> list:
        """Stored speech and text items whose rows hold their side's stack (text never reaches a speech encoder)."""
        reach = {m: store.ids_with([f"{s}.0.{self.site}@{self.position}"]) for m, s in stacks.items()}
        items, left = [], {}
        for it in reps.stored_items(dataset, store):
            mod = reps.modality_of(it)
            if it.id in reach.get(mod, ()):
                items.append(it)
            elif mod in reach:
                left[mod] = left.get(mod, 0) + 1
        if notes is not None:
            notes += [f"{n} {m} items never reach '{stacks[m]}' and are left out of the {m} side."
                      for m, n in sorted(left.items())]
        return items

    # ---- comparisons ------------------------------------------------------------------------------------
    def _cross_modal(self, result: Result, run: str, index: dict, reader: "_Reader", depth: dict) -> int:
        layer_pairs = reps.pair_layers(depth["speech"], depth["text"])
        groups = {}
        for lang in sorted({lang for lang, m in index if m == "speech" and (lang, "text") in index}):
            sids, a_ids, b_ids = reps.matched_ids(index, (lang, "speech"), (lang, "text"))
            if len(sids) < self.min_items:
                result.notes.append(f"cross-modal {lang}: only {len(sids)} paired items; skipped.")
            else:
                groups[lang] = (a_ids, b_ids)
        if not groups:
            return 0
        curves = {lang: np.zeros((len(layer_pairs), 2)) for lang in groups}
        rows = []
        for n, (la, lb) in enumerate(layer_pairs):  # layer outer: each layer is read once
            reader.clear()
            for lang, (a_ids, b_ids) in groups.items():
                r = reader.compare(("speech", la, a_ids), ("text", lb, b_ids), self.baseline_permutations,
                                   self.seed)
                curves[lang][n] = r.similarity, r.baseline
                rows.append({"run": run, "language": lang, "layer": la, "text_layer": lb, "items": len(a_ids),
                             "k_speech": r.kx, "k_text": r.ky, "svcca": r.similarity, "baseline": r.baseline})
        rows.sort(key=lambda r: (r["language"], r["layer"]))
        for lang, arr in curves.items():
            result.arrays[f"{run}/crossmodal/{lang}"] = arr  # (layers, [svcca, baseline])
            gain = arr[:, 0] - np.nan_to_num(arr[:, 1])
            if run == "baseline" and np.isfinite(gain).any():
                best = int(np.nanargmax(gain))
                result.summary[f"cross-modal {lang}: best layer (svcca - baseline)"] = layer_pairs[best][0]
                result.summary[f"cross-modal {lang}: svcca / baseline there"] = [arr[best, 0], arr[best, 1]]
                _note_no_gain(result, f"Cross-modal {lang}", gain[best])
        result.tables.append(Table(f"Cross-modal SVCCA per layer (speech vs text) ({run})", rows))
        result.figures[f"svcca_crossmodal_{run}"] = curve_plot(
            curves, [p[0] for p in layer_pairs], f"Cross-modal SVCCA, speech vs text ({run})",
            "layer" if depth["speech"] == depth["text"] else "speech-side layer")
        return len(curves)

    def _cross_lingual(self, result: Result, run: str, index: dict, reader: "_Reader", depth: dict) -> int:
        found = 0
        for modality in ("speech", "text"):
            langs = sorted(lang for lang, m in index if m == modality)
            pairs = {}
            for i, a in enumerate(langs):
                for j in range(i + 1, len(langs)):
                    sids, a_ids, b_ids = reps.matched_ids(index, (a, modality), (langs[j], modality))
                    if len(sids) < self.min_items:
                        result.notes.append(f"cross-lingual {modality} {a}-{langs[j]}: only {len(sids)} paired "
                                            "items; skipped.")
                    else:
                        pairs[(i, j)] = (a_ids, b_ids)
            if not pairs:
                continue
            found += len(pairs)
            n_layers = depth[modality]
            sim = np.full((n_layers, len(langs), len(langs)), np.nan)
            base = np.full_like(sim, np.nan)
            rows = []
            for layer in range(n_layers):
                reader.clear()
                for (i, j), (a_ids, b_ids) in pairs.items():
                    r = reader.compare((modality, layer, a_ids), (modality, layer, b_ids),
                                       self.baseline_permutations, self.seed)
                    sim[layer, i, j] = sim[layer, j, i] = r.similarity
                    base[layer, i, j] = base[layer, j, i] = r.baseline
                    rows.append({"run": run, "modality": modality, "layer": layer, "language_a": langs[i],
                                 "language_b": langs[j], "items": len(a_ids), "k_a": r.kx, "k_b": r.ky,
                                 "svcca": r.similarity, "baseline": r.baseline})
                np.fill_diagonal(sim[layer], 1.0)
            result.arrays[f"{run}/crosslingual/{modality}/svcca"] = sim  # (layers, languages, languages)
            result.arrays[f"{run}/crosslingual/{modality}/baseline"] = base
            result.arrays[f"{run}/crosslingual/{modality}/languages"] = np.array(langs)
            result.tables.append(Table(f"Cross-lingual SVCCA per layer and language pair ({modality}) ({run})",
                                       rows, show=False))
            off = ~np.eye(len(langs), dtype=bool)
            mean_sim, mean_base = _offdiag_mean(sim, off), _offdiag_mean(base, off)
            result.tables.append(Table(f"Cross-lingual SVCCA, mean over language pairs ({modality}) ({run})",
                                       [{"layer": layer, "svcca": mean_sim[layer], "baseline": mean_base[layer]}
                                        for layer in range(n_layers)]))
            gain = mean_sim - np.nan_to_num(mean_base)
            if run == "baseline" and np.isfinite(gain).any():
                best = int(np.nanargmax(gain))
                result.summary[f"cross-lingual {modality}: best layer (mean svcca - baseline)"] = best
                result.summary[f"cross-lingual {modality}: svcca / baseline there"] = [mean_sim[best],
                                                                                       mean_base[best]]
                _note_no_gain(result, f"Cross-lingual {modality}", gain[best])
            result.figures[f"svcca_crosslingual_{modality}_{run}"] = curve_plot(
                {"mean over language pairs": np.stack([mean_sim, mean_base], 1)}, list(range(n_layers)),
                f"Cross-lingual SVCCA, {modality} ({run})", "layer")
            shown = reps.spread_layers(list(range(n_layers)), self.heatmap_layers)
            result.figures[f"svcca_languages_{modality}_{run}"] = heatmaps(
                sim, langs, shown, f"Cross-lingual SVCCA between {modality} of each language pair ({run} run)")
        return found


def _note_no_gain(result: Result, what: str, best_gain: float) -> None:
    """Say so when no layer beats the shuffled baseline: the "best layer" is then only the least bad one."""
    if np.isfinite(best_gain) and best_gain <= 0:
        result.notes.append(f"{what}: SVCCA is at or below the shuffled-pairs baseline at every layer (best "
                            f"difference {best_gain:+.3f}), so the same sentences are no more aligned than "
                            "random pairs; its 'best layer' is only the least bad one.")


def _offdiag_mean(mats: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Per layer, the mean over computed language pairs (NaN where none was computed)."""
    vals = mats[:, off]
    ok = np.isfinite(vals)
    return np.where(ok.any(1), np.where(ok, vals, 0).sum(1) / np.maximum(ok.sum(1), 1), np.nan)


class _Reader:
    """Reads a layer once for every stored item and caches each side's SVD-reduced, whitened form.

    ``clear`` is called when the loop moves to the next layer, so memory holds one or two layers at a time.
    """

    def __init__(self, store: Any, ids: list[str], stacks: dict[str, str], site: str, position: str,
                 variance: float, epsilon: float) -> None:
        self.store, self.stacks, self.site, self.position = store, stacks, site, position
        self.ids: dict[str, list[str]] = {}  # per stack: the items whose rows hold it, in dataset order
        for stack in set(stacks.values()):
            held = store.ids_with([f"{stack}.0.{site}@{position}"])
            self.ids[stack] = [i for i in ids if i in held]
        self.row = {stack: {i: n for n, i in enumerate(v)} for stack, v in self.ids.items()}
        self.variance, self.epsilon = variance, epsilon
        self._raw: dict[str, np.ndarray] = {}
        self._reduced: dict[tuple, tuple[np.ndarray, int]] = {}
        self.ks: list[int] = []  # every k the SVD step kept, for the summary
        self.compared: list[tuple[str, ...]] = []  # the id lists reduced, for the small-sample note

    def clear(self) -> None:
        self._raw.clear()
        self._reduced.clear()

    def reduced(self, modality: str, layer: int, ids: list[str]) -> tuple[np.ndarray, int]:
        key = (modality, layer, tuple(ids))
        if key not in self._reduced:
            stack = self.stacks[modality]
            site = f"{stack}.{layer}.{self.site}"
            if site not in self._raw:
                self._raw[site] = reps.load_layer(self.store, site, self.position, self.ids[stack])
            r = svd_reduce(self._raw[site][[self.row[stack][i] for i in ids]], self.variance)
            self._reduced[key] = (whiten(r, self.epsilon), r.shape[1])
            self.ks.append(r.shape[1])
            self.compared.append(tuple(ids))
        return self._reduced[key]

    def compare(self, a: tuple[str, int, list[str]], b: tuple[str, int, list[str]], permutations: int,
                seed: int) -> SVCCA:
        wx, kx = self.reduced(*a)
        wy, ky = self.reduced(*b)
        return svcca_reduced(wx, wy, kx, ky, permutations, seed)



@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [SVCCAAnalysis]
