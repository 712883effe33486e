"""Seed 004's lens tests: the arithmetic by hand, and each test on the tiny Qwen2-Audio against a lens computed
directly from the stored states, with and without an intervention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.collect import collect
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Stores
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.hublens.measure import (
    label_words,
    no_overlap_baselines,
    normalised_yes,
    span_alignment,
)
from lalm_probe.plugins.analyses.hublens.plugin import HubLens
from lalm_probe.plugins.interventions.unembed_steer import UnembedSteer

TINY = ["--model", "qwen2audio", "--checkpoint", "tiny"]


def test_the_arithmetic_by_hand():
    assert label_words("bird chirping, tweeting") == ["bird", "chirping", "tweeting"]
    labels = ["dog barking", "dog howling", "cat meowing", "frog croaking"]
    picks = no_overlap_baselines(labels, seed=0)
    assert picks == no_overlap_baselines(labels, seed=0)
    for label, pick in zip(labels, picks):
        assert not set(label_words(label)) & set(label_words(pick))
    assert no_overlap_baselines(["a b", "b c"], 0) == [None, None]
    lp = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    assert span_alignment(lp, [1, 3]) == pytest.approx(np.mean([np.mean(np.log([0.2, 0.3])),
                                                                np.mean(np.log([0.4, 0.1]))]))
    np.testing.assert_allclose(normalised_yes(np.array([0.2, 0.0]), np.array([0.6, 0.5])), [0.25, 0.0])


def lens_logprobs(session, hidden, layer, norm=False):
    return torch.log_softmax(session.view.lens(np.array(hidden), "lm", norm, layer), -1).numpy()


def run_test(session, spec, data, tmp_path, edits=()):
    reads = spec.requirements(session.view, data).reads()
    prompt = lambda it: spec.prompt(session.view, it)  # noqa: E731
    stores = Stores(baseline=collect(session, data, reads, ActivationStore(tmp_path / "b", {}), prompt_fn=prompt))
    if edits:
        stores.intervened = collect(session, data, reads, ActivationStore(tmp_path / "i", {}), prompt_fn=prompt,
                                    edits=edits)
    return spec.analyze(session.view, data, stores), stores


def parallel() -> Dataset:
    sentences = {"s1": {"en": "The cat sleeps.", "de": "Die Katze schläft.", "fr": "Le chat dort."},
                 "s2": {"en": "Bread is good.", "de": "Gutes Brot.", "fr": "Beau pain."}}
    return Dataset([Stimulus(f"{sid}-{lang}", text=text, prompt="Translate:",
                             labels={"semantic_id": sid, "language": lang, "transcript": text})
                    for sid, by_lang in sentences.items() for lang, text in by_lang.items()])


def test_eq3_compares_the_dominant_and_the_input_language_continuation(qwen_session, tmp_path):
    data = parallel()
    spec = HubLens(test="anchor", token="plain")  # the tiny tokenizer has one token per character
    result, stores = run_test(qwen_session, spec, data, tmp_path)
    assert result.summary["items in the dominant language (left out)"] == 2
    assert result.summary["items compared"] == 3  # "Beau pain." and "Bread is good." share "B"
    tok = qwen_session.plugin.tokenizer
    ids = ["s1-de", "s1-fr", "s2-de"]
    h = stores.baseline.array("lm.4.out@last", ids)[:]
    lp = lens_logprobs(qwen_session, h, 4)
    first = {i: tok(t, add_special_tokens=False)["input_ids"][0] for i, t in [
        ("s1-de", "Die"), ("s1-fr", "Le"), ("s2-de", "Gutes"), ("s1-en", "The"), ("s2-en", "Bread")]}
    np.testing.assert_allclose(result.arrays["baseline/logprob_input"][:, 4],
                               [lp[n, first[i]] for n, i in enumerate(ids)], rtol=1e-5)
    np.testing.assert_allclose(result.arrays["baseline/logprob_dominant"][:, 4],
                               [lp[0, first["s1-en"]], lp[1, first["s1-en"]], lp[2, first["s2-en"]]], rtol=1e-5)
    wins = result.arrays["baseline/dominant_wins"]
    assert wins.shape == (8,) and ((wins >= 0) & (wins <= 1)).all()
    best = HubLens(test="anchor", token="best")
    again, _ = run_test(qwen_session, best, data, tmp_path / "best")
    assert (again.arrays["baseline/logprob_input"] >= result.arrays["baseline/logprob_input"] - 1e-6).all()


def test_the_audio_lens_scores_label_words_over_the_audio_positions(qwen_session, tmp_path):
    labels = ["dog barking", "cat meowing", "frog croaking", "dog howling"]
    data = Dataset([Stimulus(f"a{i}", audio=tone(150 + 50 * i, 0.4), sample_rate=SR, labels={"sound": lab})
                    for i, lab in enumerate(labels)])
    spec = HubLens(test="audio", label="sound", seed=1)
    result, stores = run_test(qwen_session, spec, data, tmp_path)
    tok = qwen_session.plugin.tokenizer
    h = stores.baseline.ragged("lm.3.out@all:audio", ["a1"])[0]
    lp = lens_logprobs(qwen_session, h, 3)
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("cat", "meowing")]
    by_hand = np.exp(np.mean([lp[:, t].mean() for t in words]))
    assert result.arrays["baseline/matching"][1, 3] == pytest.approx(by_hand, rel=1e-5)
    random = no_overlap_baselines(labels, 1)
    other = [tok(w, add_special_tokens=False)["input_ids"][0] for w in label_words(random[1])]
    assert result.arrays["baseline/random"][1, 3] == pytest.approx(np.exp(np.mean([lp[:, t].mean() for t in other])),
                                                                   rel=1e-5)
    with pytest.raises(UserError, match="test=audio needs label=<key>"):
        HubLens(test="audio")


def test_normalised_yes_with_and_without_steering(qwen_session, tmp_path):
    data = Dataset([Stimulus(f"a{i}", audio=tone(150 + 60 * i, 0.4), sample_rate=SR,
                             labels={"mammal": "yes" if i % 2 else "no"}) for i in range(4)])
    spec = HubLens(test="yesno", group="mammal", yes="Yes", no="No")
    steer = UnembedSteer(new="Yes", old="No", strength=30.0, layer=5)
    result, stores = run_test(qwen_session, spec, data, tmp_path, edits=steer.edits(qwen_session.view))
    tok = qwen_session.plugin.tokenizer
    y, n = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    for run in ("baseline", "intervened"):
        h = getattr(stores, run).array("lm.7.out@last", [it.id for it in data])[:]
        p = torch.softmax(qwen_session.view.lens(h, "lm", True, 7), -1).numpy()  # the model's own output
        np.testing.assert_allclose(result.arrays[f"{run}/normalised_yes"][:, 7], p[:, y] / (p[:, y] + p[:, n]),
                                   rtol=1e-5)
    shift = result.summary["normalised p(Yes) at the output, all (intervened - baseline)"]
    assert shift > 0  # steering from "No" to "Yes" in the middle of the LM raises p(Yes)
    assert {"all", "mammal=no", "mammal=yes"} <= set(result.tables[0].rows[0])


def test_hub_lens_runs_from_the_cli_beside_an_intervention(capsys, tmp_path, gender_manifest):
    out = tmp_path / "run"
    code = main(["run", *TINY, "--analysis", "hub-lens:test=yesno,question=Is this a man?,group=gender", "--data",
                 str(gender_manifest), "--intervention", "unembed-steer:new=Yes,old=No,layer=4,strength=25",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    arrays = np.load(out / "arrays.npz")
    assert arrays["baseline/normalised_yes"].shape == arrays["intervened/normalised_yes"].shape == (12, 8)
    with pytest.raises(UserError, match="test must be one of anchor, audio, yesno"):
        HubLens(test="colour")
