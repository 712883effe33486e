"""`probe run` end to end for the geometry analyses (clusters, svcca, hub) on the tiny Qwen2-Audio.

Data: the built-in espeak-ng parallel sentences, kept small (5 sentences x 3 languages, one voice, plus the text
of each: 30 items), so collection, t-SNE, SVD and CCA stay fast. Each distinct command line runs once per module;
tests that need the same run share it. The checks read the run directory (run.json, results.json, arrays.npz,
plots/) and what was printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lalm_probe.core import cli
from lalm_probe.core.cli import main

LANGS = ["de", "en", "fr"]
SENTENCES = ["s01", "s02", "s03", "s04", "s05"]
DATA = f"synth:parallel?languages={','.join(LANGS)}&voices=m1&sentences={','.join(SENTENCES)}"
N_SPEECH = N_TEXT = len(LANGS) * len(SENTENCES)
LM_LAYERS, AUDIO_LAYERS = 8, 2  # the tiny Qwen2-Audio


class Run:
    """One finished run directory, read back."""

    def __init__(self, out: Path, printed: str) -> None:
        self.out, self.printed = out, printed
        self.record = json.loads((out / "run.json").read_text())
        self.results = json.loads((out / "results.json").read_text())
        with np.load(out / "arrays.npz") as npz:
            self.arrays = {k: npz[k] for k in npz.files}

    def table(self, starts: str) -> list[dict[str, Any]]:
        found = [t for t in self.results["tables"] if t["title"].startswith(starts)]
        assert len(found) == 1, [t["title"] for t in self.results["tables"]]
        return found[0]["rows"]

    def plots(self) -> dict[str, int]:
        return {p.stem: p.stat().st_size for p in (self.out / "plots").glob("*.png")}


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory):
    """``probe("svcca:compare=[modality]", batch_size=4)`` -> Run; each command line runs once per module.

    One thread for PyTorch and the analyses: the problems are tiny, and on a busy 2-core machine a second
    thread makes a run up to 5x slower (spinning OpenMP workers), never faster.
    """
    import torch

    cache: dict[tuple[str, int], Run] = {}
    threads, env = torch.get_num_threads(), os.environ.get("LALM_PROBE_THREADS")
    torch.set_num_threads(1)
    os.environ["LALM_PROBE_THREADS"] = "1"

    def run(analysis: str, batch_size: int = 8) -> Run:
        if (analysis, batch_size) not in cache:
            out = tmp_path_factory.mktemp("run")
            with cli.console.capture() as cap:  # what the terminal would show
                code = main(["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", analysis,
                             "--data", DATA, "--out", str(out), "--batch-size", str(batch_size)])
            assert code == 0, f"probe run --analysis {analysis} exited {code}"
            cache[(analysis, batch_size)] = Run(out, cap.get())
        return cache[(analysis, batch_size)]

    yield run
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("LALM_PROBE_THREADS", None)
    else:
        os.environ["LALM_PROBE_THREADS"] = env


def assert_complete(run: Run, figures: set[str]) -> None:
    assert run.record["status"] == "complete"
    assert run.record["dataset"]["items"] == N_SPEECH + N_TEXT
    sizes = run.plots()
    assert figures <= set(sizes), sorted(sizes)
    assert all(sizes[f] > 10_000 for f in figures), sizes  # a real plot, not an empty canvas
    assert {"results.json", "arrays.npz"} <= set(run.record["files"])


# ---- clusters ------------------------------------------------------------------------------------------
CLUSTERS = "clusters:labels=[language,semantic_id,modality],space=both,plot_layers=[0,-1]"


def test_clusters_writes_silhouettes_for_every_layer_and_label(probe):
    run = probe(CLUSTERS)
    assert_complete(run, {"silhouette_baseline", "tsne_language_baseline", "tsne_semantic_id_baseline",
                          "tsne_modality_baseline"})
    rows = run.table("Silhouette per layer")
    assert [r["layer"] for r in rows] == list(range(LM_LAYERS))
    for r in rows:
        for label in ("language", "semantic_id", "modality"):
            for space in ("tsne", "full"):
                assert -1 <= r[f"{label} ({space})"] <= 1, r
        assert r["mean_norm"] > 0
    for label in ("language", "semantic_id", "modality"):
        for space in ("tsne", "full"):
            curve = run.arrays[f"baseline/silhouette/{label}/{space}"]
            assert curve.shape == (LM_LAYERS,) and np.isfinite(curve).all()
    # speech and text are far apart in a random LM: modality separates better than language
    assert max(r["modality (full)"] for r in rows) > max(r["language (full)"] for r in rows)
    assert run.arrays["baseline/tsne/0"].shape == (N_SPEECH + N_TEXT, 2)
    # distances: the chosen layers only (first and last), items and centroids
    items = run.table("Euclidean distances between items in the full space")
    assert {r["layer"] for r in items} == {0, LM_LAYERS - 1}
    assert {"A1", "A2", "B1"} <= {r["name"] for r in items} and {"A1", "B1"} <= set(items[0])  # short columns
    d = run.arrays[f"baseline/item_distance/{LM_LAYERS - 1}"]
    assert d.shape[0] == d.shape[1] >= 4 and np.allclose(d, d.T) and np.allclose(np.diag(d), 0)
    cents = run.table("Distances between cluster centroids in the full space")
    assert {(r["label"], r["group_a"], r["group_b"]) for r in cents if r["layer"] == 0} >= {
        ("language", "de", "en"), ("language", "en", "fr"), ("modality", "speech", "text")}
    assert run.arrays["baseline/centroid_distance/language/3"].shape == (3, 3)
    summary = run.results["summary"]
    assert summary["language: best layer (full)"] in range(LM_LAYERS)
    assert "max silhouette" in run.printed and "Silhouette per layer" in run.printed


def test_clusters_on_the_audio_encoder_uses_the_speech_items_only(probe):
    run = probe("clusters:stack=audio_encoder,labels=[language,semantic_id],space=full,normalize=true")
    assert_complete(run, {"silhouette_baseline", "tsne_language_baseline"})
    rows = run.table("Silhouette per layer")
    assert [r["layer"] for r in rows] == list(range(AUDIO_LAYERS))
    assert all(-1 <= r[k] <= 1 for r in rows for k in ("language", "semantic_id"))
    assert len(run.arrays["baseline/ids"]) == N_SPEECH
    assert all(i.split("-")[-1] != "text" for i in run.arrays["baseline/ids"])
    assert any(f"{N_TEXT} text items never reach 'audio_encoder'" in n for n in run.results["notes"])
    assert any("L2-normalised" in t["title"] for t in run.results["tables"])


# ---- svcca ---------------------------------------------------------------------------------------------
def test_svcca_cross_modal_and_cross_lingual_tables_and_matrices(probe):
    run = probe("svcca")
    assert_complete(run, {"svcca_crossmodal_baseline", "svcca_crosslingual_speech_baseline",
                          "svcca_crosslingual_text_baseline", "svcca_languages_speech_baseline",
                          "svcca_languages_text_baseline"})
    rows = run.table("Cross-modal SVCCA per layer")
    assert {(r["language"], r["layer"]) for r in rows} == {(lang, i) for lang in LANGS for i in range(LM_LAYERS)}
    for r in rows:
        assert r["items"] == len(SENTENCES) and r["text_layer"] == r["layer"]
        assert 0 <= r["svcca"] <= 1 + 1e-9 and 0 <= r["random_baseline"] <= 1 + 1e-9
        assert 1 <= r["k_speech"] < len(SENTENCES) and 1 <= r["k_text"] < len(SENTENCES)
    for modality in ("speech", "text"):
        sim = run.arrays[f"baseline/crosslingual/{modality}/svcca"]
        assert sim.shape == (LM_LAYERS, len(LANGS), len(LANGS))
        assert np.allclose(sim, sim.transpose(0, 2, 1)) and np.allclose(sim[:, range(3), range(3)], 1)
        assert ((sim >= 0) & (sim <= 1 + 1e-9)).all()
        assert list(run.arrays[f"baseline/crosslingual/{modality}/languages"]) == LANGS
        mean = run.table(f"Cross-lingual SVCCA, mean over language pairs ({modality})")
        assert [r["layer"] for r in mean] == list(range(LM_LAYERS))
        pairs = run.table(f"Cross-lingual SVCCA per layer and language pair ({modality})")
        assert len(pairs) == LM_LAYERS * 3  # de-en, de-fr, en-fr
    assert run.arrays["baseline/crossmodal/en"].shape == (LM_LAYERS, 3)
    summary = run.results["summary"]
    assert summary["stacks"] == {"speech": "lm", "text": "lm"} and summary["variance (s²)"] == 0.9
    assert "cross-modal en: best layer (svcca - baseline)" in summary
    assert "best layer" in run.printed


def test_svcca_speech_encoder_against_lm_pairs_layers_by_depth(probe):
    """stacks=[audio_encoder,lm]: speech-side keys are read for speech ids, text-side keys for text ids."""
    run = probe("svcca:stacks=[audio_encoder,lm],compare=[modality,language],baseline_permutations=2")
    assert_complete(run, {"svcca_crossmodal_baseline", "svcca_crosslingual_speech_baseline"})
    rows = run.table("Cross-modal SVCCA per layer")
    assert {(r["layer"], r["text_layer"]) for r in rows} == {(0, 0), (1, LM_LAYERS - 1)}
    assert all(0 <= r["svcca"] <= 1 + 1e-9 and r["items"] == len(SENTENCES) for r in rows)
    assert run.arrays["baseline/crosslingual/speech/svcca"].shape == (AUDIO_LAYERS, 3, 3)
    assert run.arrays["baseline/crosslingual/text/svcca"].shape == (LM_LAYERS, 3, 3)
    assert run.results["summary"]["stacks"] == {"speech": "audio_encoder", "text": "lm"}
    assert not any("never reach" in n for n in run.results["notes"])


# ---- hub -----------------------------------------------------------------------------------------------
def test_hub_similarity_with_cis_and_lens_language_probabilities(probe):
    run = probe("hub:table_languages=[de,en,fr],table_words=2000")  # wordfreq's lists of the data's languages
    assert_complete(run, {"hub_similarity_baseline", "hub_language_lens_baseline"})
    rows = run.table("Baseline-adjusted cosine per layer, 95% CI")
    comparisons = {r["comparison"] for r in rows}
    assert comparisons == {f"{lang}: speech vs text" for lang in LANGS} | {
        f"{mod}: {lang} vs en" for mod in ("speech", "text") for lang in ("de", "fr")}
    for r in rows:
        assert r["pairs"] == len(SENTENCES) and -2 <= r["score"] <= 2
        assert r["ci_low"] <= r["score"] <= r["ci_high"]
        assert r["score"] == pytest.approx(r["matched_cos"] - r["nonmatched_cos"], abs=1e-9)
    assert sorted({r["layer"] for r in rows}) == list(range(LM_LAYERS))
    by_comparison = run.table("Baseline-adjusted cosine per layer, by comparison")
    assert [r["layer"] for r in by_comparison] == list(range(LM_LAYERS))
    assert run.arrays["baseline/similarity/en: speech vs text"].shape == (LM_LAYERS, 3)
    p = run.arrays["baseline/language_lens/p_language"]
    assert p.shape == (LM_LAYERS, N_SPEECH + N_TEXT, len(LANGS))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-9)
    assert list(run.arrays["token_table/languages"]) == LANGS
    lens = run.table("Lens language distribution p(language | h)")
    assert {(r["modality"], r["input_language"]) for r in lens} == {(m, lang) for m in ("speech", "text")
                                                                     for lang in LANGS}
    assert all(0 <= r["p_input"] <= 1 and 0 <= r["p_en"] <= 1 and r["top_language"] in LANGS for r in lens)
    summary = run.results["summary"]
    assert summary["similarity: comparisons"] == 7 and summary["token table: languages"] == LANGS
    assert "p(en|h), non-en speech input: peak layer" in summary
    assert "adjusted cosine" in run.printed


def test_hub_on_the_audio_encoder_with_all_pairs_and_bootstrap_cis(probe):
    """Text items never reach the audio encoder: only speech pairs are compared, with a note."""
    run = probe("hub:stack=audio_encoder,language_lens=false,pairs=all,ci=bootstrap")
    assert_complete(run, {"hub_similarity_baseline"})
    rows = run.table("Baseline-adjusted cosine per layer, 95% CI (bootstrap)")
    assert {r["comparison"] for r in rows} == {"speech: de vs en", "speech: de vs fr", "speech: en vs fr"}
    assert sorted({r["layer"] for r in rows}) == list(range(AUDIO_LAYERS))
    assert all(r["ci_low"] <= r["score"] <= r["ci_high"] and r["pairs"] == len(SENTENCES) for r in rows)
    assert any(f"{N_TEXT} text items never reach 'audio_encoder'" in n for n in run.results["notes"])
    assert "hub_language_lens_baseline" not in run.plots()


def test_hub_lens_needs_an_unembedding(capsys, tmp_path):
    """Asked for on an encoder, the lens is an error (left unset, it is skipped with a note)."""
    code = main(["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis",
                 "hub:stack=audio_encoder,language_lens=true",
                 "--data", DATA, "--out", str(tmp_path / "run")])
    assert code == 2 and "language_lens=false" in capsys.readouterr().err


# ---- batch size ----------------------------------------------------------------------------------------
def test_results_do_not_depend_on_batch_size(probe):
    """Batches pad to their longest item; padding must not leak into the mean-pooled states nor the scores.

    (t-SNE is the exception: it is chaotic in its input, so its silhouettes agree to about 0.01 only; see
    clusters' notes. Everything computed in the representation space agrees to 1e-5.)
    """
    a, b = probe("svcca", batch_size=8), probe("svcca", batch_size=1)
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        if a.arrays[k].dtype.kind == "f":
            np.testing.assert_allclose(a.arrays[k], b.arrays[k], atol=1e-5, rtol=1e-4, err_msg=k)
        else:
            assert (a.arrays[k] == b.arrays[k]).all(), k
    rows_a, rows_b = a.table("Cross-modal SVCCA per layer"), b.table("Cross-modal SVCCA per layer")
    assert [r["svcca"] for r in rows_a] == pytest.approx([r["svcca"] for r in rows_b], abs=1e-5)
    # clusters at the last position: full-space silhouettes and distances agree; t-SNE ones are not compared
    a, b = probe(CLUSTERS, batch_size=8), probe(CLUSTERS, batch_size=1)
    exact = [k for k in a.arrays if a.arrays[k].dtype.kind == "f" and "tsne" not in k]
    assert any("/silhouette/" in k for k in exact) and any("/item_distance/" in k for k in exact)
    for k in exact:
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], atol=1e-5, rtol=1e-4, err_msg=k)
