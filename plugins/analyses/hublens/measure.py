"""The arithmetic of seed 004's logit-lens tests, on arrays (semantic-hub code: ``multilingual/logit_lens.py``,
``audio/logit_lens.py``, ``audio/intervention.py``).

- Eq. 3 (dominant-language anchoring): per layer, ``log p_lens(τ*|h)`` of the dominant-language continuation
  against ``log p_lens(τ°|h)`` of the input-language one. The reference averages log-probabilities over positions
  and keeps, per position, the best of several translations; here each item has one continuation per language and
  ``token=best`` keeps the better of its bare and space-prefixed first token (App. A: "the configuration that
  maximizes the probability").
- App. C.2 (audio): for each word of an item's label, the log-probability of its first token averaged over the
  audio positions, then averaged over the words, then exponentiated (a geometric mean, as the reference applies exp
  after averaging); the baseline is a random label of the data sharing no word with the true one.
- §4 audio: the normalised ``p(Yes) / (p(Yes) + p(No))`` at the answer position.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def label_words(label: str) -> list[str]:
    """The words of a label, split on commas and spaces as the reference does ("bird chirping, tweeting")."""
    return [w for part in str(label).split(",") for w in part.strip().split(" ") if w]


def first_token(tokenizer: Any, text: str, space: bool) -> int | None:
    """The first token of ``text`` (``space``: of " text"), without special tokens; None if it has none."""
    text = text.strip()
    ids = tokenizer((" " + text) if space else text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


def no_overlap_baselines(labels: Sequence[str], seed: int) -> list[str | None]:
    """For each label, a random other label of the data sharing no word with it (None when there is none)."""
    rng = np.random.default_rng(seed)
    pool = sorted(set(labels))
    words = {lab: set(label_words(lab)) for lab in pool}
    out = []
    for lab in labels:
        choices = [c for c in pool if not words[c] & words[lab]]
        out.append(choices[int(rng.integers(len(choices)))] if choices else None)
    return out


def span_alignment(logprobs: np.ndarray, token_ids: Sequence[int]) -> float:
    """Mean over words of the mean over positions of ``log p(first token of the word)``: ``logprobs`` is
    (positions, vocab); the caller exponentiates (the geometric mean of the reference)."""
    return float(logprobs[:, list(token_ids)].mean(axis=0).mean())


def normalised_yes(p_yes: np.ndarray, p_no: np.ndarray) -> np.ndarray:
    """``p(Yes) / (p(Yes) + p(No))``."""
    p_yes, p_no = np.asarray(p_yes, dtype=np.float64), np.asarray(p_no, dtype=np.float64)
    return p_yes / (p_yes + p_no)
