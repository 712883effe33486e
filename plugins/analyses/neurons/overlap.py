"""Cross-modal comparison of language-selective units (seed 002 §3.3 (ii), §4.2, App. A.3, A.4).

- Overlap matrix (released ``utils/make_plots.py``): ``M[text_j, speech_i] = |S_text_j ∩ S_speech_i|`` for the
  unit sets selected per language in each modality (units are ``(site, unit)``, the union over layers of one
  stack); raw counts, rows = text languages, columns = speech languages. Both axes hold the same languages in
  the same order, so the diagonal pairs a language with itself.
- Diagonal overlap ratio: ``trace_sum`` = trace(M) / sum(M) (default), or ``mean_ratio`` = mean(diag) /
  mean(off-diagonal). The seed's formula did not survive in our copy of the text, but its numbers fix the
  choice: it reports the ratio as a percentage (56.6% at t=1, 34.63% and 36.83% later) and calls it above chance
  at every step, which fits trace/sum (chance 1/n = 20% for 5 languages) and not mean(diag)/mean(offdiag) (whose
  chance level is 1, so 0.35 would be *below* chance).
- Exact permutation test over language matchings: every one of the n! ways to pair text languages with speech
  languages (column permutations); statistic = trace of the permuted matrix; p = share of permutations whose
  trace is >= the observed one (the identity included, so p >= 1/n!). Column permutations keep sum(M) and so
  the off-diagonal sum, which makes both ratios monotone in the trace: the p value is the same for either.
- Spearman correlation of per-unit AP across modalities (released ``utils/spearman_ap.py``): for each text
  language j and speech language i, ``scipy.stats.spearmanr`` of the AP columns of the two tables over the
  units they share (inner join on ``(site, unit)``, restricted to one stack as the released code restricts to
  the text decoder); diagonal concentration (App. A.3, Eq. 1) = sum of the diagonal / sum of all entries
  ("proportion of correlation mass on the diagonal", chance 1/n; 22.9% at t=1 in the paper). ``absolute=True``
  uses |rho| instead, for matrices with negative correlations where the plain proportion is not a share.
- Sensitivity to k (App. A.4): the diagonal ratio for each k in a list, each table ranked once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Hashable, Literal, Mapping, Sequence, Set

import numpy as np
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.neurons.selection import ranking
from lalm_probe.plugins.analyses.neurons.table import ExpertiseTable
from scipy.stats import spearmanr

Definition = Literal["trace_sum", "mean_ratio"]
DEFINITIONS: tuple[str, ...] = ("trace_sum", "mean_ratio")
MAX_LANGUAGES = 10  # 10! = 3,628,800 matchings; beyond that an exact test is not enumerable here


@dataclass(frozen=True)
class Overlap:
    """Raw overlap counts: ``counts[j, i]`` = units shared by text language j and speech language i."""

    counts: np.ndarray
    languages: tuple[str, ...]


@dataclass(frozen=True)
class PermutationTest:
    """Exact test: ``null`` holds the trace under every column permutation (identity first)."""

    statistic: float
    p_value: float
    permutations: int
    null: np.ndarray


@dataclass(frozen=True)
class KSensitivity:
    """Diagonal ratio and overlap matrix for each k."""

    ks: tuple[int, ...]
    ratios: np.ndarray
    matrices: tuple[np.ndarray, ...]


def overlap_matrix(text_sets: Mapping[str, Set[Hashable]], speech_sets: Mapping[str, Set[Hashable]]) -> Overlap:
    """Counts of shared units, rows = text languages, columns = speech languages, in the text order."""
    languages = tuple(text_sets)
    if set(languages) != set(speech_sets):
        raise UserError(f"Text and speech selections must cover the same languages; text has "
                        f"{', '.join(sorted(text_sets))}, speech has {', '.join(sorted(speech_sets))}.")
    counts = np.array([[len(text_sets[t] & speech_sets[s]) for s in languages] for t in languages], dtype=np.int64)
    return Overlap(counts=counts, languages=languages)


def diagonal_ratio(matrix: np.ndarray | Overlap, definition: Definition = "trace_sum") -> float:
    """How much of the overlap sits on same-language pairs; NaN when the denominator is 0."""
    m = _square(matrix)
    n = len(m)
    diag = float(np.trace(m))
    total = float(m.sum())
    if definition == "trace_sum":
        return diag / total if total else math.nan
    if definition == "mean_ratio":
        if n < 2:
            raise UserError("mean_ratio needs at least 2 languages (an off-diagonal).")
        off = (total - diag) / (n * n - n)
        return (diag / n) / off if off else math.nan
    raise UserError(f"Unknown diagonal ratio '{definition}'. Available: {', '.join(DEFINITIONS)}.")


def permutation_test(matrix: np.ndarray | Overlap) -> PermutationTest:
    """Exact p value of the diagonal over all n! language matchings (statistic: the trace)."""
    m = _square(matrix).astype(np.float64)
    n = len(m)
    if n > MAX_LANGUAGES:
        raise UserError(f"An exact permutation test over {n} languages needs {math.factorial(n)} matchings; "
                        f"at most {MAX_LANGUAGES} languages are supported.")
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.intp).reshape(-1, n)
    null = m[np.arange(n), perms].sum(axis=1)  # trace of M with columns permuted by each matching
    observed = float(null[0])  # the identity comes first
    hits = int(np.count_nonzero(null >= observed - 1e-12 * max(1.0, abs(observed))))
    return PermutationTest(statistic=observed, p_value=hits / len(perms), permutations=len(perms), null=null)


def aligned_ap(tables: Mapping[str, ExpertiseTable], stack: str | None = None) -> dict[str, np.ndarray]:
    """AP of each table over the units all of them share, in one common order (inner join on (site, unit))."""
    if not tables:
        raise UserError("No expertise tables given.")
    parts = {lang: t.rows(t.stack == _stack_of(t, stack)) for lang, t in tables.items()}
    first = next(iter(parts.values()))
    if all(np.array_equal(t.site, first.site) and np.array_equal(t.unit, first.unit) for t in parts.values()):
        return {lang: t.ap for lang, t in parts.items()}
    common = set.intersection(*(set(t.keys()) for t in parts.values()))
    order = [key for key in first.keys() if key in common]
    out = {}
    for lang, t in parts.items():
        where = {key: i for i, key in enumerate(t.keys())}
        out[lang] = t.ap[[where[key] for key in order]]
    return out


def ap_spearman(text_ap: Mapping[str, np.ndarray], speech_ap: Mapping[str, np.ndarray]) -> np.ndarray:
    """Spearman rho of aligned AP vectors: ``rho[j, i]`` for text language j vs speech language i."""
    languages = tuple(text_ap)
    if set(languages) != set(speech_ap):
        raise UserError("Text and speech AP must cover the same languages.")
    columns = [np.asarray(text_ap[lang], dtype=np.float64) for lang in languages]
    columns += [np.asarray(speech_ap[lang], dtype=np.float64) for lang in languages]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("AP vectors differ in length: align them first (aligned_ap).")
    n = len(languages)
    rho = spearmanr(np.column_stack(columns)).statistic  # ranks every column once
    return np.array([[rho]]) if n == 1 else np.asarray(rho)[:n, n:]


def diagonal_concentration(rho: np.ndarray, absolute: bool = False) -> float:
    """Share of the correlation mass on the diagonal: sum(diag) / sum(all) (App. A.3 Eq. 1); NaN if sum is 0."""
    m = np.abs(_square(rho)) if absolute else _square(rho)
    total = float(m.sum())
    return float(np.trace(m)) / total if total else math.nan


def ratio_by_k(text_tables: Mapping[str, ExpertiseTable], speech_tables: Mapping[str, ExpertiseTable],
               ks: Sequence[int], kind: Literal["top", "bottom", "both"] = "top", stack: str | None = None,
               definition: Definition = "trace_sum") -> KSensitivity:
    """Diagonal ratio of the speech x text overlap for each k (App. A.4), each table ranked once."""
    if kind not in ("top", "bottom", "both"):
        raise UserError(f"Unknown selection kind '{kind}'. Available: top, bottom, both.")
    ranked = {side: {lang: _ranked_keys(t, kind, stack) for lang, t in tables.items()}
              for side, tables in (("text", text_tables), ("speech", speech_tables))}
    ratios, matrices = [], []
    for k in ks:
        sets = {side: {lang: _take(r, k, kind) for lang, r in by_lang.items()} for side, by_lang in ranked.items()}
        m = overlap_matrix(sets["text"], sets["speech"])
        ratios.append(diagonal_ratio(m, definition))
        matrices.append(m.counts)
    return KSensitivity(ks=tuple(int(k) for k in ks), ratios=np.array(ratios), matrices=tuple(matrices))


def _ranked_keys(table: ExpertiseTable, kind: str, stack: str | None) -> dict[str, list[tuple[str, int]]]:
    rows = np.flatnonzero(table.stack == _stack_of(table, stack))
    directions = ("top", "bottom") if kind == "both" else (kind,)
    return {d: table.keys(ranking(table, d, rows)) for d in directions}  # type: ignore[arg-type]


def _take(ranked: dict[str, list[tuple[str, int]]], k: int, kind: str) -> set[tuple[str, int]]:
    size = len(next(iter(ranked.values())))
    need = 2 * k if kind == "both" else k
    if k < 1 or need > size:
        raise UserError(f"k = {k} does not fit: the stack has {size} units ({kind} needs {need}).")
    return set().union(*(keys[:k] for keys in ranked.values()))


def _stack_of(table: ExpertiseTable, stack: str | None) -> str:
    stacks = table.stacks()
    if stack is None:
        if len(stacks) != 1:
            raise UserError(f"The expertise table has several stacks ({', '.join(stacks)}); choose one.")
        return stacks[0]
    if stack not in stacks:
        raise UserError(f"Stack '{stack}' is not in the expertise table. It has: {', '.join(stacks)}.")
    return stack


def _square(matrix: np.ndarray | Overlap) -> np.ndarray:
    m = np.asarray(matrix.counts if isinstance(matrix, Overlap) else matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"a diagonal needs a non-empty square matrix (same languages on both axes), got {m.shape}.")
    return m
