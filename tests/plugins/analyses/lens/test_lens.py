"""AudioLens math against hand computation, and the prompt formats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.lens.audiolens import (
    attribute_prompt,
    critical_layer,
    information_scores,
    label_token_ids,
)
from lalm_probe.plugins.analyses.lens.plugin import LogitLens


def test_information_score_is_argmax_accuracy_per_layer():
    # layers x items x labels; targets [0, 1, 1]
    probs = np.array([[[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]],     # 2 of 3 right
                      [[0.1, 0.9], [0.4, 0.6], [0.3, 0.7]]])    # 2 of 3 right (item 0 wrong)
    np.testing.assert_allclose(information_scores(probs, np.array([0, 1, 1])), [2 / 3, 2 / 3])
    assert np.isnan(information_scores(probs[:, :0], np.array([], dtype=int))).all()


def test_critical_layer_matches_equations_3_and_4():
    scores = np.array([0.5, 0.55, 0.9, 1.0])  # |Y| = 2, alpha = 0.2 -> threshold 0.6
    s = np.maximum(0, scores - 0.6)
    expected = (s * np.arange(1, 5)).sum() / s.sum()  # the paper numbers layers from 1
    assert critical_layer(scores, 2, 0.2, first=1) == pytest.approx(expected)
    assert critical_layer(scores, 2, 0.2, first=1) == pytest.approx((0.3 * 3 + 0.4 * 4) / 0.7)
    assert critical_layer(scores, 2, 0.2) == pytest.approx(expected - 1)  # this tool's site index from 0
    assert math.isnan(critical_layer(np.array([0.5, 0.55]), 2, 0.2))  # nothing clears the threshold


def test_prompt_formats_follow_table_one():
    p1 = attribute_prompt("gender", "direct", ["male", "female"])
    assert p1.user is None and p1.assistant_prefix == "The speaker's gender is"
    p2 = attribute_prompt("language", "qa", [])
    assert p2.user == "What is the language spoken in the speech?"
    p3 = attribute_prompt("animal", "mc", ["dog", "cat"])
    assert p3.user == "What animal makes the sound? Possible options: dog, cat."
    with pytest.raises(UserError, match="Unknown prompt format"):
        attribute_prompt("gender", "essay", [])


def test_language_labels_in_any_spelling_score_as_the_audiolens_words():
    from lalm_probe.core.data import Dataset, Stimulus

    labels = ["de", "deu", "German", "zh-CN", "Mandarin", "en"]
    ds = Dataset([Stimulus(f"i{k}", text="x", labels={"language": v}) for k, v in enumerate(labels)])
    lens = LogitLens(attribute="language")
    ys, words = lens.label_set(ds)
    assert ys == words == ["English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean"]
    assert lens._targets(ds, ys).tolist() == [1, 1, 1, 5, 5, 0]
    bad = Dataset([Stimulus("a", text="x", labels={"language": "id"})])
    with pytest.raises(UserError, match=r"Labels \['id'\] are not in the AudioLens 'language' set"):
        lens.label_set(bad)


def test_label_tokens_refuse_words_sharing_a_first_token(qwen_session):
    tok = qwen_session.plugin.tokenizer  # byte-level: the first token is the first byte
    assert len(set(label_token_ids(tok, ["male", "female"], leading_space=False))) == 2
    with pytest.raises(UserError, match="share their first token"):
        label_token_ids(tok, ["fear", "female"], leading_space=False)


def test_analysis_scores_equal_hand_computed_lens(qwen_session, tmp_path):
    """The analysis' label probabilities equal softmax(lm_head(norm(h))) at the label tokens, by hand."""
    import torch
    from helpers import SR, tone
    from lalm_probe.core.collect import collect
    from lalm_probe.core.data import Dataset, Stimulus
    from lalm_probe.core.plugin import Stores
    from lalm_probe.core.store import ActivationStore

    ds = Dataset([Stimulus(f"i{k}", audio=tone(100 + 30 * k, 0.4), sample_rate=SR,
                           labels={"gender": "male" if k % 2 else "female"}) for k in range(6)])
    lens = LogitLens(attribute="gender", positions=["last"], heatmap_items=0)
    view = qwen_session.view
    store = collect(qwen_session, ds, lens.requirements(view, ds).reads(), ActivationStore(tmp_path, {"t": 1}),
                    prompt_fn=lambda it: lens.prompt(view, it))
    result = lens.analyze(view, ds, Stores(baseline=store))
    model = qwen_session.plugin.model
    _, arrays = store.load(["lm.3.out@last"], order=[it.id for it in ds])
    ids = label_token_ids(qwen_session.plugin.tokenizer, ["male", "female"], False)
    with torch.no_grad():
        p = torch.softmax(model.lm_head(model.model.language_model.norm(torch.tensor(arrays["lm.3.out@last"]))), -1)
    np.testing.assert_allclose(result.arrays["baseline/last/label_probs"][3], p[:, ids].numpy(), rtol=1e-5)
    targets = np.array([0 if it.labels["gender"] == "male" else 1 for it in ds])
    expected = (p[:, ids].numpy().argmax(-1) == targets).mean()
    assert result.arrays["baseline/last/information_score/all"][3] == pytest.approx(expected)
    assert result.summary["accuracy (baseline @last)"] == result.arrays["baseline/last/information_score/all"][-1]


def test_the_tools_own_summary_is_labelled_and_tested_against_chance():
    """Item 6: the paper's metric is the critical layer; the 90%-of-peak sentence is the tool's own summary, named
    so, and it claims nothing unless the best layer beats chance (one-sided binomial, Bonferroni over layers)."""
    from lalm_probe.core.results import Result
    from scipy import stats

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=40)
    strong = np.zeros((4, 40, 2))
    for layer, right in enumerate((0.5, 0.6, 0.95, 0.9)):  # share of items read correctly per layer
        ok = rng.random(40) < right
        strong[layer, np.arange(40), np.where(ok, targets, 1 - targets)] = 1.0
    for probs, claims in ((strong, True), (np.full((4, 40, 2), 0.5) + rng.normal(0, 0.01, (4, 40, 2)), False)):
        result = Result()
        LogitLens(label="gender")._scores(result, {"baseline": {"labels": ["female", "male"], "targets": targets,
                                                                "positions": {"last": {"label_probs": probs}}}}, "last")
        curve = information_scores(probs, targets)
        peak = int(np.argmax(curve))
        p = min(1.0, stats.binomtest(round(curve[peak] * 40), 40, 0.5, alternative="greater").pvalue * 4)
        assert result.summary["p_above_chance (peak layer, Bonferroni over layers)"] == pytest.approx(p)
        assert "critical_layer (baseline @last)" in result.summary  # the paper's metric, beside it
        text = result.summary["summary (the tool's, not a paper metric)"]
        assert ("is read off the lens" in text) == claims and ("nothing to report" in text) == (not claims)


def test_an_intervened_run_gets_its_own_chance_test_and_per_label_table(capsys, tmp_path, gender_manifest):
    import json

    from lalm_probe.core.cli import main

    out = tmp_path / "masked"
    assert main(["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis",
                 "logitlens:attribute=gender,prompt_format=mc", "--intervention", "audio-mask", "--data",
                 str(gender_manifest), "--out", str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    summary, arrays = results["summary"], np.load(out / "arrays.npz")
    for key in ("p_above_chance (peak layer, Bonferroni over layers)",
                "p_above_chance (intervened) (peak layer, Bonferroni over layers)"):
        assert 0.0 <= summary[key] <= 1.0
    titles = [t["title"] for t in results["tables"] if t["title"].startswith("Per label")]
    assert titles == ["Per label at the last layer @last (baseline) (rows: true label)",
                      "Per label at the last layer @last (intervened) (rows: true label)"]
    for run, name in (("baseline", "confusion"), ("intervened", "intervened/confusion")):
        predicted = arrays[f"{run}/last/label_probs"][-1].argmax(-1)
        assert arrays[name].sum() == len(predicted) and np.trace(arrays[name]) == pytest.approx(
            summary[f"accuracy ({run} @last)"] * len(predicted))
