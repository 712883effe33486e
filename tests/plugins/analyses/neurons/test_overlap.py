"""Cross-modal overlap, diagonal ratios, the exact permutation test and Spearman on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.neurons.overlap import (
    aligned_ap,
    ap_spearman,
    diagonal_concentration,
    diagonal_ratio,
    overlap_matrix,
    permutation_test,
    ratio_by_k,
)
from lalm_probe.plugins.analyses.neurons.table import from_columns
from scipy.stats import spearmanr


def table_of(ap_by_unit: dict[tuple[str, int], float]) -> object:
    keys = list(ap_by_unit)
    ap = np.array([ap_by_unit[k] for k in keys])
    return from_columns({"site": [k[0] for k in keys], "stack": [k[0].split(".")[0] for k in keys],
                          "layer": [int(k[0].split(".")[1]) for k in keys], "component": ["fc1"] * len(keys),
                          "unit": [k[1] for k in keys], "ap": ap, "on_p50": ap, "on_p90": ap, "off_mean": ap,
                          "off_p50": ap})


def test_overlap_counts_shared_units_with_text_rows_and_speech_columns() -> None:
    text = {"de": {1, 2, 3, 4}, "fr": {5, 6}, "ja": {7}}
    speech = {"fr": {5, 1}, "ja": {7, 8, 2}, "de": {1, 2, 3}}
    m = overlap_matrix(text, speech)
    assert m.languages == ("de", "fr", "ja")
    np.testing.assert_array_equal(m.counts, [[3, 1, 1], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(UserError, match="same languages"):
        overlap_matrix(text, {"de": set(), "fr": set()})


def test_diagonal_ratio_offers_trace_over_sum_and_mean_diag_over_mean_offdiag() -> None:
    m = np.array([[3, 1, 1], [0, 1, 0], [0, 0, 1]])
    assert diagonal_ratio(m) == pytest.approx(5 / 7)  # the default: trace / sum
    assert diagonal_ratio(m, "mean_ratio") == pytest.approx((5 / 3) / (2 / 6))
    uniform = np.ones((5, 5))
    assert diagonal_ratio(uniform) == pytest.approx(0.2) and diagonal_ratio(uniform, "mean_ratio") == 1.0
    assert math.isnan(diagonal_ratio(np.zeros((3, 3))))
    with pytest.raises(UserError, match="Unknown diagonal ratio"):
        diagonal_ratio(m, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square"):
        diagonal_ratio(np.ones((2, 3)))


def test_a_perfect_diagonal_of_three_languages_has_exact_p_one_sixth() -> None:
    result = permutation_test(np.diag([4, 5, 6]))
    assert result.permutations == 6 and result.statistic == 15
    assert result.p_value == pytest.approx(1 / 6)
    # one swap keeps the third language on the diagonal (4, 5 or 6); the two 3-cycles keep none
    assert sorted(result.null.tolist()) == [0, 0, 4, 5, 6, 15]


def test_a_tied_matching_counts_toward_the_p_value() -> None:
    # swapping languages 0 and 1 keeps the trace at 5; the other four matchings give 2: p = 2/6
    result = permutation_test(np.array([[2, 2, 0], [2, 2, 0], [0, 0, 1]]))
    assert result.p_value == pytest.approx(2 / 6)
    assert permutation_test(np.ones((4, 4))).p_value == 1.0  # no structure: every matching ties


def test_five_languages_reach_the_smallest_p_of_one_over_120_and_both_ratios_give_it() -> None:
    rng = np.random.default_rng(0)
    m = rng.integers(0, 20, size=(5, 5)) + np.diag([60, 70, 80, 90, 99])
    result = permutation_test(m)
    assert result.permutations == 120 and result.p_value == pytest.approx(1 / 120)
    null_trace_sum = result.null / m.sum()  # the ratio under each matching is monotone in the trace
    assert diagonal_ratio(m) == pytest.approx(null_trace_sum[0]) and null_trace_sum.argmax() == 0
    with pytest.raises(UserError, match="at most 10 languages"):
        permutation_test(np.eye(11))


def test_spearman_of_ap_matches_hand_computed_rank_correlations() -> None:
    text = {"de": np.array([0.1, 0.2, 0.3, 0.4]), "fr": np.array([0.9, 0.5, 0.4, 0.2])}
    speech = {"de": np.array([0.1, 0.3, 0.2, 0.4]), "fr": np.array([0.7, 0.2, 0.3, 0.1])}
    rho = ap_spearman(text, speech)
    # 1 - 6 Σd² / (n(n²-1)) with n = 4: Σd² = 2 -> 0.8, Σd² = 18 -> -0.8
    np.testing.assert_allclose(rho, [[0.8, -0.8], [-0.8, 0.8]], atol=1e-12)
    for j, t in enumerate(text):
        for i, s in enumerate(speech):
            assert rho[j, i] == pytest.approx(spearmanr(text[t], speech[s]).statistic)
    assert math.isnan(diagonal_concentration(rho))  # correlation mass sums to 0: no share to speak of
    assert diagonal_concentration(rho, absolute=True) == pytest.approx(0.5)
    assert diagonal_concentration(np.array([[0.6, 0.2], [0.1, 0.5]])) == pytest.approx(1.1 / 1.4)


def test_aligned_ap_joins_tables_on_site_and_unit_within_one_stack() -> None:
    a = table_of({("dec.0", 0): 0.1, ("dec.0", 1): 0.2, ("dec.1", 0): 0.3, ("enc.0", 0): 0.9})
    b = table_of({("dec.1", 0): 0.7, ("dec.0", 1): 0.6, ("enc.0", 0): 0.1})
    got = aligned_ap({"text": a, "speech": b}, stack="dec")
    np.testing.assert_array_equal(got["text"], [0.2, 0.3])
    np.testing.assert_array_equal(got["speech"], [0.6, 0.7])
    with pytest.raises(UserError, match="several stacks"):
        aligned_ap({"text": a})
    with pytest.raises(UserError, match="Stack 'lm' is not"):
        aligned_ap({"text": a}, stack="lm")


def test_ratio_by_k_recomputes_the_diagonal_for_each_k() -> None:
    # per language, units ranked by AP; the first 2 are shared across modalities, the next 2 are swapped
    # between languages, so top-2 overlaps only on the diagonal and top-4 spreads the overlap off it
    def tables(order: dict[str, list[int]]) -> dict[str, object]:
        return {lang: table_of({("dec.0", u): 1.0 - 0.01 * rank for rank, u in enumerate(units)}
                               | {("dec.0", u): 0.0 for u in range(20) if u not in units})
                for lang, units in order.items()}

    text = tables({"de": [0, 1, 10, 11], "fr": [5, 6, 12, 13]})
    speech = tables({"de": [0, 1, 12, 13], "fr": [5, 6, 10, 11]})
    result = ratio_by_k(text, speech, [1, 2, 4])
    np.testing.assert_allclose(result.ratios, [1.0, 1.0, 0.5])
    np.testing.assert_array_equal(result.matrices[2], [[2, 2], [2, 2]])
    both = ratio_by_k(text, speech, [2], kind="both")  # + the 2 lowest-AP units (16..19 tie; ranked by unit)
    assert both.matrices[0][0, 0] == 4
    with pytest.raises(UserError, match="does not fit"):
        ratio_by_k(text, speech, [21])
