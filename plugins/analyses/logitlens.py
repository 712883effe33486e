"""Logit lens (AudioLens, seed 003; semantic hub, seed 004).

Each layer's output at chosen positions is projected to the vocabulary, with the final norm (AudioLens, via
Patchscopes: ``softmax(W_U · norm(h))``) or without it (semantic hub: ``softmax(W_U · h)``). With labelled data
and label words it computes AudioLens' layer-wise information score

    I_i^l = mean_n [ y_n == argmax_{y in Y} p_{i,n}^l(y) ]          (Eq. 2)

where p(y) is the lens probability of the first token of y's word, the critical layer
``sum_l s_l·l / sum_l s_l`` with ``s_l = max(0, I_l − (1+alpha)/|Y|)`` (Eq. 3-4), accuracy (= I at the last
layer), scores on correctly and incorrectly predicted samples, and last vs penultimate position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import find
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Analysis, Requirements
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.results import Result, Table

# AudioLens Table I: the three prompt formats and the SAKURA label sets, per attribute.
ATTRIBUTES: dict[str, dict[str, Any]] = {
    "gender": {"prefix": "The speaker's gender is", "question": "What is the gender of the speaker in the speech?",
               "labels": ["male", "female"]},
    "language": {"prefix": "The speech's spoken language is", "question": "What is the language spoken in the speech?",
                 "labels": ["English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean"]},
    "emotion": {"prefix": "The speaker's emotion is", "question": "What is the emotion of the speaker in the speech?",
                "labels": ["angry", "disgust", "fear", "happy", "sad"]},
    "animal": {"prefix": "The sound file's animal is", "question": "What animal makes the sound?",
               "labels": ["dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow"]},
}
FORMATS = ("direct", "qa", "mc")


def attribute_prompt(attribute: str, prompt_format: str, options: list[str]) -> Prompt:
    """The AudioLens P1/P2/P3 prompt: an assistant prefix ending in 'is', optionally after a (MC) question."""
    if attribute not in ATTRIBUTES:
        raise UserError(f"Unknown attribute '{attribute}'; AudioLens templates exist for {', '.join(ATTRIBUTES)}.")
    if prompt_format not in FORMATS:
        raise UserError(f"Unknown prompt format '{prompt_format}'; choose one of {', '.join(FORMATS)}.")
    spec = ATTRIBUTES[attribute]
    user = None
    if prompt_format in ("qa", "mc"):
        user = spec["question"]
    if prompt_format == "mc":
        user += f" Possible options: {', '.join(options)}."
    return Prompt(user=user, assistant_prefix=spec["prefix"])


def information_scores(label_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Eq. 2: per layer, the fraction of items whose most probable label is the true one.

    ``label_probs``: (layers, items, |Y|); ``targets``: (items,) indices into Y.
    """
    if label_probs.shape[1] == 0:
        return np.full(label_probs.shape[0], np.nan)
    return (label_probs.argmax(-1) == targets[None, :]).mean(axis=1)


def critical_layer(scores: np.ndarray, n_labels: int, alpha: float = 0.2) -> float:
    """Eq. 3-4 with layers numbered 1..L as in the paper; NaN when no layer clears the threshold."""
    contrib = np.maximum(0.0, np.nan_to_num(scores) - (1 + alpha) / n_labels)
    if contrib.sum() == 0:
        return float("nan")
    layers = np.arange(1, len(scores) + 1)
    return float((contrib * layers).sum() / contrib.sum())


def label_token_ids(tokenizer: Any, words: list[str], leading_space: bool) -> list[int]:
    """First sub-token of each label word; AudioLens' code tokenizes the bare word (no leading space)."""
    ids = []
    for w in words:
        pieces = tokenizer(((" " + w) if leading_space else w), add_special_tokens=False)["input_ids"]
        if not pieces:
            raise UserError(f"Label word '{w}' tokenizes to nothing.")
        ids.append(pieces[0])
    clash = {i for i in ids if ids.count(i) > 1}
    if clash:
        same = [w for w, i in zip(words, ids) if i in clash]
        raise UserError(f"Label words {same} share their first token, so the lens cannot tell them apart; "
                        "pass distinct words with words={...} or token=space.")
    return ids


@dataclass
class LogitLens(Analysis):
    """Vocabulary projection per layer; information score and critical layer with labelled data."""

    name: ClassVar[str] = "logitlens"
    description: ClassVar[str] = "Logit lens per layer/position; AudioLens information score and critical layer"

    stack: str | None = None  # default: the model's lens stack (the LM / text decoder)
    norm: bool = True  # apply the final norm (AudioLens); false reproduces the semantic-hub lens
    positions: list[str] = field(default_factory=lambda: ["last", "token:-2"])  # last and penultimate
    top_k: int = 5
    label: str | None = None  # the label key holding the attribute (e.g. gender)
    attribute: str | None = None  # gender|language|emotion|animal: use the AudioLens prompts and label set
    prompt_format: str = "direct"  # direct (P1), qa (P2) or mc (P3)
    words: dict | None = None  # label value -> word whose first token is scored (default: the value itself)
    token: str = "plain"  # plain: first token of the bare word (AudioLens code); space: of " word"
    alpha: float = 0.2
    heatmap_items: int = 1  # single-input layer x position heat maps for the first N items
    chunk: int = 64  # items projected at once (bounds memory for large vocabularies)

    def __post_init__(self) -> None:
        if self.attribute and not self.label:
            self.label = self.attribute
        if self.token not in ("plain", "space"):
            raise UserError("logitlens: token must be 'plain' or 'space'.")

    # ---- set-up ------------------------------------------------------------------------------------
    def _stack(self, session: Any) -> str:
        name = self.stack or session.plugin.lens_stack
        if not name:
            raise UserError(f"Model '{session.plugin.name}' has no stack with an unembedding for the logit lens.")
        return name

    def label_set(self, dataset: Dataset, model_words: dict[str, str] | None = None) -> tuple[list[Any], list[str]]:
        """Label values Y (the AudioLens set for a known attribute, else the values in the data) and their words.

        A word is taken from ``words``, else from how the model spells the label (``model_words``: Whisper's
        ``<|de|>`` for language ``de``), else it is the value itself.
        """
        values = dataset.label_values(self.label)
        present = sorted({str(v) for v in values})
        if self.attribute:
            canonical = ATTRIBUTES[self.attribute]["labels"]
            unknown = [v for v in present if self._canonical(v, canonical) is None and v not in (self.words or {})]
            if unknown:
                raise UserError(f"Labels {unknown} are not in the AudioLens '{self.attribute}' set {canonical}; "
                                "map them with words={...}.")
            ys = canonical
        else:
            ys = present
        lookup = {**(model_words or {}), **(self.words or {})}
        words = [str(lookup.get(y, y)) for y in ys]
        return ys, words

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

    def prompt(self, session: Any, item: Stimulus) -> Prompt:
        if not self.attribute:
            return session.plugin.default_prompt(item)
        return attribute_prompt(self.attribute, self.prompt_format, ATTRIBUTES[self.attribute]["labels"])

    def requirements(self, session: Any, dataset: Dataset) -> Requirements:
        return Requirements(sites=[f"{self._stack(session)}.*.out"], positions=list(self.positions),
                            labels=[self.label] if self.label else [])

    # ---- computation -------------------------------------------------------------------------------
    def project(self, session: Any, hidden: np.ndarray, label_ids: list[int] | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Top-k token ids and probabilities, and the label-token probabilities, for (items, d) states."""
        ids, probs, labels = [], [], []
        for start in range(0, len(hidden), self.chunk):
            p = torch.softmax(session.lens(hidden[start:start + self.chunk], self._stack(session), self.norm), -1)
            top = p.topk(min(self.top_k, p.shape[-1]), dim=-1)
            ids.append(top.indices.cpu().numpy())
            probs.append(top.values.cpu().numpy())
            if label_ids is not None:
                labels.append(p[:, label_ids].cpu().numpy())
        return np.concatenate(ids), np.concatenate(probs), (np.concatenate(labels) if labels else None)

    def lens_tables(self, session: Any, dataset: Dataset, store: Any) -> dict[str, Any]:
        """Everything per position: top-k arrays, label probabilities, information scores."""
        stack = self._stack(session)
        n_layers = session.plugin.resolved[stack].num_layers
        ids = [it.id for it in dataset]
        label_ids = ys = targets = None
        if self.label:
            ys, words = self.label_set(dataset, None if self.attribute else session.plugin.label_words(self.label))
            label_ids = label_token_ids(session.plugin.tokenizer, words, self.token == "space")
            targets = self._targets(dataset, ys)
        out: dict[str, Any] = {"labels": ys, "targets": targets, "positions": {}}
        for pos in self.positions:
            keys = [f"{stack}.{layer}.out@{pos}" for layer in range(n_layers)]
            _, arrays = store.load(keys, order=ids)
            per = [self.project(session, arrays[k], label_ids) for k in keys]
            entry = {"top_ids": np.stack([p[0] for p in per], 1), "top_probs": np.stack([p[1] for p in per], 1)}
            if label_ids is not None:
                entry["label_probs"] = np.stack([p[2] for p in per])  # (layers, items, |Y|)
            out["positions"][pos] = entry
        return out

    def analyze(self, session: Any, dataset: Dataset, stores: dict[str, Any]) -> Result:
        stack = self._stack(session)
        tok = session.plugin.tokenizer
        result = Result(summary={"stack": stack, "final_norm_applied": self.norm, "items": len(dataset)})
        runs = {name: self.lens_tables(session, dataset, store) for name, store in stores.items()}
        base = runs["baseline"]
        first = self.positions[0]
        top = base["positions"][first]
        result.tables.append(Table(f"Top-{self.top_k} lens tokens per layer for '{dataset[0].id}' @{first}", [
            {"layer": layer, "tokens": [tok.convert_ids_to_tokens(int(i)) for i in top["top_ids"][0, layer]],
             "probs": [float(p) for p in top["top_probs"][0, layer]]} for layer in range(top["top_ids"].shape[1])]))
        for name, run in runs.items():
            for pos, entry in run["positions"].items():
                result.arrays[f"{name}/{pos}/top_ids"] = entry["top_ids"]
                result.arrays[f"{name}/{pos}/top_probs"] = entry["top_probs"]
                if "label_probs" in entry:
                    result.arrays[f"{name}/{pos}/label_probs"] = entry["label_probs"]
        if self.label:
            self._scores(result, runs, dataset)
        from lalm_probe.plugins.analyses.lens_plots import heatmaps

        result.figures.update(heatmaps(self, session, dataset))
        return result

    def _scores(self, result: Result, runs: dict[str, Any], dataset: Dataset) -> None:
        from lalm_probe.plugins.analyses.lens_plots import score_plot

        base = runs["baseline"]
        ys, targets = base["labels"], base["targets"]
        last = self.positions[0]
        final_pred = base["positions"][last]["label_probs"][-1].argmax(-1)
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
                crit = critical_layer(curves["all"], len(ys), self.alpha)
                acc = float(curves["all"][-1])
                tag = f"{name} @{pos}"
                result.summary[f"critical_layer ({tag})"] = crit
                result.summary[f"accuracy ({tag})"] = acc
                rows += [{"run": name, "position": pos, "layer": layer, "I_all": curves["all"][layer],
                          "I_correct": curves["correct"][layer], "I_incorrect": curves["incorrect"][layer]}
                         for layer in range(lp.shape[0])]
                result.figures[f"information_score_{name}_{pos.replace(':', '')}"] = score_plot(
                    curves, len(ys), self.alpha, f"{self.label}: information score per layer ({tag})")
        curve = information_scores(base["positions"][last]["label_probs"], targets)
        resolved = int(np.argmax(curve >= 0.9 * curve.max())) + 1
        result.summary["finding"] = (
            f"'{self.label}' is read off the lens at {last} with accuracy {curve[-1]:.0%} at the last layer "
            f"(chance {1 / len(ys):.0%}); the information score first reaches 90% of its peak at layer "
            f"{resolved} of {len(curve)}.")
        result.summary["labels"] = ys
        result.summary["chance"] = 1 / len(ys)
        result.summary["correct / incorrect items"] = f"{int(correct.sum())} / {int((~correct).sum())}"
        result.notes.append("critical layer uses the paper's numbering: layer 1 = output of the first block "
                            "(site index + 1); NaN means no layer cleared (1+alpha)/|Y|.")
        result.tables.append(Table("Information score per layer", rows))


@hookimpl
def lalm_probe_analyses() -> list[type]:
    return [LogitLens]
