"""The arithmetic of activation patching: logit differences and the normalised patching effect.

For a target (corrupted) item t patched with the states of a source (clean) item s, with a the answer token of s
and b that of t, the logit difference is ``LD(x) = logit_x[a] − logit_x[b]`` and the normalised effect of a patch
is ``(LD(patched) − LD(t)) / (LD(s) − LD(t))``: 0 when the patch changes nothing, 1 when it gives the clean run's
difference (Wang et al. 2023, Zhang & Nanda 2024). It is undefined (NaN) when the two runs do not differ.
"""

from __future__ import annotations

import numpy as np


def logit_difference(logits: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``logits[i, a[i]] − logits[i, b[i]]`` for (items, vocab) logits."""
    rows = np.arange(len(logits))
    return logits[rows, a] - logits[rows, b]


def normalised_effect(patched: np.ndarray, corrupted: np.ndarray, clean: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``(patched − corrupted) / (clean − corrupted)``; NaN where clean and corrupted are equal."""
    gap = np.asarray(clean, dtype=np.float64) - np.asarray(corrupted, dtype=np.float64)
    out = np.full(gap.shape, np.nan)
    ok = np.abs(gap) > eps
    out[ok] = (np.asarray(patched, dtype=np.float64)[ok] - np.asarray(corrupted, dtype=np.float64)[ok]) / gap[ok]
    return out
