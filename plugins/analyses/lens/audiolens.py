"""AudioLens (Yang et al., ASRU 2025; seed 003): prompts, label tokens, information score, critical layer.

Pure functions on arrays. The information score of layer l is

    I^l = mean_n [ y_n == argmax_{y in Y} p^l_n(y) ]          (Eq. 2)

with p(y) the lens probability of the first token of y's word, and the critical layer is
``sum_l s_l * l / sum_l s_l`` with ``s_l = max(0, I^l - (1 + alpha)/|Y|)`` (Eq. 3-4). Layers are numbered from
``first`` (0 in this tool's tables: the site index; the paper counts from 1, which adds exactly 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from scipy import stats

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
        raise UserError(f"Unknown attribute '{attribute}'; AudioLens templates exist for {', '.join(ATTRIBUTES)} "
                        "(or pass label=<key> to score any label with the model's own prompt).")
    if prompt_format not in FORMATS:
        raise UserError(f"Unknown prompt format '{prompt_format}'; choose one of {', '.join(FORMATS)}.")
    spec = ATTRIBUTES[attribute]
    user = None
    if prompt_format in ("qa", "mc"):
        user = spec["question"]
    if prompt_format == "mc":
        user += f" Possible options: {', '.join(options)}."
    return Prompt(user=user, assistant_prefix=spec["prefix"])


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


def information_scores(label_probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Eq. 2: per layer, the fraction of items whose most probable label is the true one.

    ``label_probs``: (layers, items, |Y|); ``targets``: (items,) indices into Y.
    """
    if label_probs.shape[1] == 0:
        return np.full(label_probs.shape[0], np.nan)
    return (label_probs.argmax(-1) == targets[None, :]).mean(axis=1)


def critical_layer(scores: np.ndarray, n_labels: int, alpha: float = 0.2, first: int = 0) -> float:
    """Eq. 3-4 with layers numbered from ``first``; NaN when no layer clears the threshold (1+alpha)/|Y|."""
    contrib = np.maximum(0.0, np.nan_to_num(scores) - (1 + alpha) / n_labels)
    if contrib.sum() == 0:
        return float("nan")
    layers = np.arange(first, first + len(scores))
    return float((contrib * layers).sum() / contrib.sum())


def above_chance(correct: int, total: int, n_labels: int, tests: int = 1) -> float:
    """One-sided binomial p value that ``correct`` of ``total`` beats chance 1/|Y|, Bonferroni-corrected for
    ``tests`` comparisons (one per layer when the best layer is picked)."""
    if total == 0:
        return float("nan")
    p = stats.binomtest(int(correct), int(total), 1.0 / n_labels, alternative="greater").pvalue
    return float(min(1.0, p * tests))


def confusion(targets: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """``(|Y|, |Y|)`` counts: row = true label, column = label the lens reads."""
    out = np.zeros((n_labels, n_labels), dtype=int)
    np.add.at(out, (targets, predicted), 1)
    return out
