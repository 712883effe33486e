"""SVCCA between parallel representations (Lee et al., NAACL 2025 = seed 001; Raghu et al. 2017).

Two sets of vectors for the *same* items (paired by ``semantic_id``) are compared point by point: speech vs
text of one language (cross-modal, ``compare=modality``), language A vs language B within a modality
(cross-lingual, ``language``), and text of A vs speech of B (``modality+language``, the paper's Fig. 5). The
points are the layers of each side's stack, optionally preceded by an input point (``inputs=[speech site,
text site]``: the paper's "in", e.g. ``speech_encoder.features`` and ``text_encoder.embed``) and followed by an
output point (``outputs=[...]``: "len" after SeamlessM4T's length adaptor, ``speech_adaptor.output``; "pool" in
SONAR, ``speech_encoder.pooled``; ``last`` for a side's last layer, ``none`` for no point on that side).

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

Baselines (``baseline=random|shuffled|both|none``): ``random`` (default) is the paper's, SVCCA between random
vectors of the same sizes (items x units of each side), averaged over ``random_draws`` draws; it depends only on
the sizes. ``shuffled`` is the same pipeline on non-parallel pairs of the real vectors (one side's pairing
shuffled, ``baseline_permutations`` times): it also removes what any pairing of these vectors shares. With few
items CCA overfits (n ≈ k gives correlations near 1 for anything), so a baseline belongs next to every score.

Paper options: ``equal_n`` cuts every comparison of a kind to the smallest one's number of sentences, keeping the
first in dataset order (the paper cuts to 251 cross-modal and 194 cross-lingual sentences); ``levels`` (a JSON
object or a file of ``language<TAB>level`` lines) averages the cross-modal curves per resource level (Fig. 2);
``token_overlap`` correlates the share of token types parallel texts of two languages have in common (Jaccard,
the model's tokenizer, averaged over sentences) with their cross-lingual text SVCCA at the first point (the input
embeddings where ``inputs`` is given), over language pairs (§3.2: Pearson r and p).

A model that takes speech only (Whisper) has no text encoder, so there is no text side: ``compare=[modality]``
alone is refused before any collection, and beside ``language`` the cross-modal part is skipped with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lalm_probe.core.data import Dataset
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import label_code
from lalm_probe.core.plugin import Analysis, Requirements, Stores
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result
from lalm_probe.core.threads import capped
from lalm_probe.core.view import ModelView
from lalm_probe.plugins.analyses import reps
from lalm_probe.plugins.analyses.svcca.compare import NAMES, Comparisons
from lalm_probe.plugins.analyses.svcca.measure import EPSILON
from lalm_probe.plugins.analyses.svcca.reader import Point, Reader

BASELINES = {"random": ("random",), "shuffled": ("shuffled",), "both": ("random", "shuffled"), "none": ()}
COMPARE = ("modality", "language", "modality+language")


@dataclass
class SVCCAAnalysis(Analysis):
    """SVCCA per point: speech vs text per language, language x language per modality, with baselines."""

    name: ClassVar[str] = "svcca"
    description: ClassVar[str] = "SVCCA across modalities and languages per layer, against random-vector baselines"

    stack: str | None = None  # one stack for both sides (default: the lens stack, else the first)
    stacks: list[str] | None = None  # [speech_stack, text_stack] for encoder-decoder models
    site: str = "out"
    position: str = "mean"  # seed 001 mean-pools over the sequence; "last" also works
    variance: float = 0.9  # share of s² kept by the SVD step
    epsilon: float = EPSILON
    baseline: str = "random"  # random (the paper's: random vectors of the same sizes), shuffled, both or none
    random_draws: int = 5
    baseline_permutations: int = 5  # shuffles for the shuffled-pairs baseline
    seed: int = 0
    compare: list[str] = field(default_factory=lambda: ["modality", "language"])
    languages: list[str] | None = None  # restrict to these languages
    min_items: int = 5  # fewer paired items than this: the comparison is skipped with a note
    heatmap_layers: list[int] | None = None  # default first / middle / last
    inputs: list[str] | None = None  # [speech, text] sites of a point before the first layer ("in")
    outputs: list[str] | None = None  # [speech, text] sites of a point after the last layer ("len", "pool")
    levels: dict | str | None = None  # language -> resource level (JSON object or file), for averages per level
    equal_n: bool = False  # cut every comparison of a kind to the smallest one's number of sentences
    token_overlap: bool = False  # Pearson r of shared-token share vs cross-lingual text SVCCA at the first point
    gap_point: str | None = None  # the point of the language-vs-modality table (default: the last)

    def __post_init__(self) -> None:
        if not 0 < self.variance <= 1:
            raise UserError(f"svcca: variance must be in (0, 1], got {self.variance}.")
        if self.stacks is not None and len(self.stacks) != 2:
            raise UserError("svcca: stacks takes two names, the speech side then the text side, "
                            "e.g. stacks=[speech_encoder,text_encoder].")
        for what in ("inputs", "outputs"):
            if getattr(self, what) is not None and len(getattr(self, what)) != 2:
                raise UserError(f"svcca: {what} takes two sites, the speech side's then the text side's (none for "
                                f"no point on a side), e.g. {what}=[speech_encoder.features,text_encoder.embed].")
        bad = set(self.compare) - set(COMPARE)
        if bad or not self.compare:
            raise UserError(f"svcca: compare takes {', '.join(COMPARE)}; got {self.compare}.")
        if self.baseline not in BASELINES:
            raise UserError(f"svcca: baseline must be one of {', '.join(BASELINES)}, got '{self.baseline}'.")
        if self.baseline_permutations < 1 or self.random_draws < 1 or self.min_items < 3:
            raise UserError("svcca: baseline_permutations and random_draws must be >= 1 and min_items >= 3.")

    # ---- set-up -----------------------------------------------------------------------------------------
    def _stacks(self, model: ModelView) -> dict[str, str]:
        if self.stacks:
            return {"speech": reps.resolve_stack(model, self.stacks[0]),
                    "text": reps.resolve_stack(model, self.stacks[1])}
        one = reps.resolve_stack(model, self.stack)
        return {"speech": one, "text": one}

    def _extra(self, model: ModelView, spec: str, stack: str) -> str:
        """``stack.extra`` (or an extra of the side's own stack) as a site, checked against the model."""
        name, dot, extra = spec.rpartition(".")
        where = name if dot else stack
        if where not in model.resolved or extra not in model.resolved[where].extras:
            have = [f"{s}.{e}" for s, st in model.resolved.items() for e in st.extras]
            raise UserError(f"svcca: '{spec}' is not a stack-level site of '{model.name}'; it has: "
                            f"{', '.join(have) or 'none'} (or 'last', or 'none').")
        return f"{where}.{extra}"

    def points(self, model: ModelView) -> dict[str, list[tuple[Point, str]]]:
        """Per side, its points in order: ``in``, the layers of its stack, ``out``, each with its site."""
        out = {}
        for n, (mod, stack) in enumerate(self._stacks(model).items()):
            layers = reps.layer_sites(model, stack, self.site)
            if isinstance(layers[0][0], str):
                raise UserError(f"svcca compares layers; '{self.site}' is a stack-level extra of '{stack}' (give it "
                                "as inputs=[...] or outputs=[...]).")
            pts: list[tuple[Point, str]] = []
            if self.inputs and self.inputs[n] not in ("none", "-"):
                pts.append(("in", self._extra(model, self.inputs[n], stack)))
            pts += layers
            if self.outputs and self.outputs[n] not in ("none", "-"):
                pts.append(("out", layers[-1][1] if self.outputs[n] == "last" else
                            self._extra(model, self.outputs[n], stack)))
            out[mod] = pts
        return out

    def requirements(self, model: ModelView, dataset: Dataset) -> Requirements:
        points = self.points(model)
        if self.compare == ["modality"]:
            problem = reps.text_side_missing(model, dataset)
            if problem:
                raise UserError(f"svcca: cross-modal SVCCA compares the speech and the text of the same sentences, "
                                f"but {problem}. Use compare=[language] for cross-lingual SVCCA (speech vs "
                                "speech, per layer).")
        sites = []
        for stack in self._stacks(model).values():
            sites.append(f"{stack}.*.{self.site}")
        sites += [site for pts in points.values() for p, site in pts if not isinstance(p, int)]
        self._level_table()  # a bad levels file is refused before any collection
        return Requirements(sites=list(dict.fromkeys(sites)), positions=[self.position],
                            labels=["semantic_id", "language"])

    def _level_table(self) -> dict[str, str]:
        """The user's language -> resource level table (keys as language labels)."""
        if self.levels is None:
            return {}
        table = self.levels
        if isinstance(table, str):
            path = Path(table)
            if not path.is_file():
                raise UserError(f"svcca: levels file not found: {path} (give a JSON object or a file of "
                                "language<TAB>level lines).")
            text = path.read_text(encoding="utf-8")
            if text.lstrip().startswith("{"):
                table = json.loads(text)
            else:
                table = {}
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip() and not line.startswith("#"):
                        parts = line.replace(",", "\t").split("\t")
                        if len(parts) < 2:
                            raise UserError(f"{path}, line {n}: expected 'language<TAB>level'.")
                        table[parts[0].strip()] = parts[1].strip()
        return {label_code(str(k)): str(v) for k, v in table.items()}

    # ---- analysis ---------------------------------------------------------------------------------------
    @capped
    def analyze(self, model: ModelView, dataset: Dataset, stores: Stores) -> Result:
        stacks, points = self._stacks(model), self.points(model)
        baselines = BASELINES[self.baseline]
        result = Result(summary={"stacks": dict(stacks), "position": self.position, "variance (s²)": self.variance,
                                 "baselines": [NAMES[b] for b in baselines]})
        text_problem = reps.text_side_missing(model, dataset) if {"modality", "modality+language"} & set(
            self.compare) else None
        if text_problem:
            result.notes.append(f"Cross-modal SVCCA (speech vs text) skipped: {text_problem}."
                                + (" Only cross-lingual (speech vs speech) SVCCA is computed."
                                   if "language" in self.compare else ""))
        for run, store in stores.activations():
            items = self._reaching(dataset, store, points, result.notes if run == "baseline" else None)
            index, dropped = reps.parallel_index(items)
            if self.languages:
                index = {k: v for k, v in index.items() if k[0] in set(self.languages)}
            if not index:
                raise UserError("svcca needs items labelled with semantic_id and language.")
            if dropped and run == "baseline":
                result.notes.append(f"{dropped} repeated items (same sentence, language and modality, e.g. other "
                                    "voices) were left out; the first of each stands for the sentence.")
            order = {str(it.labels["semantic_id"]): n for n, it in reversed(list(enumerate(items)))
                     if "semantic_id" in it.labels}
            reader = Reader(store, [it.id for it in items], {m: dict(p) for m, p in points.items()}, self.position,
                            self.variance, self.epsilon, set(baselines), self.random_draws,
                            self.baseline_permutations, self.seed)
            job = Comparisons(self, result, run, index, order, reader, points, baselines, items, model)
            found = 0
            if "modality" in self.compare and not text_problem:
                found += job.cross_modal()
            if "language" in self.compare:
                found += job.cross_lingual()
            if "modality+language" in self.compare and not text_problem:
                found += job.mixed()
            if run == "baseline" and reader.ks:
                result.summary["SVD step: k kept (min, max)"] = [min(reader.ks), max(reader.ks)]
                fewest = min(reader.compared)
                if max(reader.ks) >= fewest / 2:
                    result.notes.append(f"Few items for CCA: up to {max(reader.ks)} SVD directions kept for as few "
                                        f"as {fewest} paired items, so canonical correlations are high for any "
                                        "pairing; read each score against its baseline, or add sentences.")
            if not found:
                raise UserError("svcca found no pair of groups sharing at least "
                                f"{self.min_items} semantic ids (speech and text of one language, or two "
                                "languages of one modality); check the semantic_id labels or lower min_items.")
        result.notes.append("SVCCA = plain mean of all canonical correlations (not cca_core's 0.98-threshold "
                            "'mean'). random_baseline: SVCCA of random vectors of the same sizes (the paper's); "
                            "shuffled_baseline: the same vectors with one side's pairing shuffled.")
        return result

    def _reaching(self, dataset: Dataset, store: Any, points: dict[str, list], notes: list[str] | None) -> list:
        """Stored speech and text items whose rows hold every point of their side (text never reaches a speech
        encoder)."""
        reach = {m: store.ids_with([f"{site}@{self.position}" for _, site in pts]) for m, pts in points.items()}
        items, left = [], {}
        for it in reps.stored_items(dataset, store):
            mod = reps.modality_of(it)
            if it.id in reach.get(mod, ()):
                items.append(it)
            elif mod in reach:
                left[mod] = left.get(mod, 0) + 1
        if notes is not None:
            notes += [f"{n} {m} items never reach every point of '{self._stacks_note(points, m)}' and are left out "
                      f"of the {m} side." for m, n in sorted(left.items())]
        return items

    @staticmethod
    def _stacks_note(points: dict[str, list], modality: str) -> str:
        return ", ".join(dict.fromkeys(site.split(".")[0] for _, site in points[modality]))


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [SVCCAAnalysis]
