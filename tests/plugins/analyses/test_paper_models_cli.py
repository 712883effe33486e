"""`probe run` of each seed analysis on the model its paper studies, on the model's tiny instance.

Seed 000's clusters on Ultravox, seed 001's SVCCA on SONAR (speech encoder vs text encoder) and SALMONN (the LM's
speech and text parts), seed 003's logit lens with layer enrichment on DeSTA2 and Qwen-Audio-Chat, seed 004's
semantic hub on SALMONN. Data: a manifest of noisy tones (5 "sentences" x 3 languages, labelled with language,
semantic id, modality and gender) plus, where the analysis compares modalities, the text of each. The checks read the
run directory: the run completed, and its tables and arrays cover every layer of the model's stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import SR, tone
from lalm_probe.core import cli
from lalm_probe.core.cli import main

LANGS = ["de", "en", "fr"]
SENTENCES = {"en": ["the cat sat", "hello world", "the mat", "a cat on the mat", "good day"],
             "fr": ["le chat", "bonjour le monde", "le tapis", "un chat sur le tapis", "bonne journee"],
             "de": ["die katze", "hallo welt", "die matte", "eine katze auf der matte", "guten tag"]}
N = 5  # sentences per language
LAYERS = 2  # every tiny LM and encoder here has 2 layers


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``paired``: speech and text items; ``speech``: the speech items only."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("paper-data")
    rng = np.random.default_rng(0)
    speech, text = [], []
    for li, lang in enumerate(LANGS):
        for si, sentence in enumerate(SENTENCES[lang]):
            clip = tone(120 + 40 * si + 15 * li, 0.5 + 0.1 * si)
            sf.write(root / f"{lang}{si}.wav", clip + 0.01 * rng.standard_normal(len(clip)).astype(np.float32), SR)
            labels = {"language": lang, "semantic_id": f"s{si}", "gender": "male" if (si + li) % 2 else "female"}
            speech.append({"id": f"{lang}-s{si}", "audio": f"{lang}{si}.wav",
                           "labels": {**labels, "modality": "speech"}})
            text.append({"id": f"{lang}-s{si}-text", "text": sentence, "labels": {**labels, "modality": "text"}})
    out = {}
    for name, rows in (("paired", speech + text), ("speech", speech)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def probe(manifests, tmp_path_factory):
    """``probe(model, analysis, data, *interventions)`` -> (run directory, results, arrays); one thread, as the
    problems are tiny and the machine is shared."""
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("LALM_PROBE_THREADS")
    torch.set_num_threads(1)
    os.environ["LALM_PROBE_THREADS"] = "1"

    def run(model: str, analysis: str, data: str, *interventions: str):
        out = tmp_path_factory.mktemp("run")
        argv = ["run", "--model", model, "--checkpoint", "tiny", "--analysis", analysis, "--data",
                str(manifests[data]), "--out", str(out), "--batch-size", "4"]
        for spec in interventions:
            argv += ["--intervention", spec]
        with cli.console.capture():
            code = main(argv)
        assert code == 0, f"probe run --model {model} --analysis {analysis} exited {code}"
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "complete"
        with np.load(out / "arrays.npz") as npz:
            arrays = {k: npz[k] for k in npz.files}
        return record, json.loads((out / "results.json").read_text()), arrays

    yield run
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("LALM_PROBE_THREADS", None)
    else:
        os.environ["LALM_PROBE_THREADS"] = env


def table(results: dict, starts: str) -> list[dict]:
    (found,) = [t for t in results["tables"] if t["title"].startswith(starts)]
    return found["rows"]


def test_clusters_on_ultravox_seed_000(probe):
    record, results, arrays = probe("ultravox", "clusters:labels=[language,modality],space=both", "paired")
    assert record["dataset"]["items"] == 6 * N
    rows = table(results, "Silhouette per layer")
    assert [r["layer"] for r in rows] == list(range(LAYERS))
    assert all(-1 <= r[f"{label} ({space})"] <= 1 for r in rows for label in ("language", "modality")
               for space in ("tsne", "full"))
    assert arrays["baseline/tsne/0"].shape == (6 * N, 2)


def test_svcca_on_sonar_compares_the_speech_encoder_with_the_text_encoder_seed_001(probe):
    _, results, arrays = probe("sonar", "svcca:stacks=[speech_encoder,text_encoder],baseline_permutations=2",
                               "paired")
    assert results["summary"]["stacks"] == {"speech": "speech_encoder", "text": "text_encoder"}
    rows = table(results, "Cross-modal SVCCA per layer")
    assert {(r["language"], r["layer"]) for r in rows} == {(lang, i) for lang in LANGS for i in range(LAYERS)}
    assert all(0 <= r["svcca"] <= 1 + 1e-9 and r["items"] == N for r in rows)
    assert arrays["baseline/crosslingual/text/svcca"].shape == (LAYERS, 3, 3)


def test_svcca_on_salmonn_reads_the_lm_s_speech_and_text_parts_seed_001(probe):
    """``position=item``: each item's own part of the LM input (its speech windows, or its text), App. B.3."""
    record, results, arrays = probe("salmonn", "svcca:position=item,baseline_permutations=2", "paired")
    assert results["summary"]["stacks"] == {"speech": "lm", "text": "lm"} and results["summary"]["position"] == "item"
    rows = table(results, "Cross-modal SVCCA per layer")
    assert {(r["language"], r["layer"]) for r in rows} == {(lang, i) for lang in LANGS for i in range(LAYERS)}
    assert all(0 <= r["svcca"] <= 1 + 1e-9 for r in rows)
    assert arrays["baseline/crosslingual/speech/svcca"].shape == (LAYERS, 3, 3)


def test_the_semantic_hub_on_salmonn_seed_004(probe):
    _, results, arrays = probe("salmonn", "hub", "paired")
    rows = table(results, "Baseline-adjusted cosine per layer, 95% CI")
    assert {f"{lang}: speech vs text" for lang in LANGS} <= {r["comparison"] for r in rows}
    assert sorted({r["layer"] for r in rows}) == list(range(LAYERS))
    p = arrays["baseline/language_lens/p_language"]
    languages = results["summary"]["token table: languages"]  # wordfreq's, independent of the data
    assert p.shape == (LAYERS, 6 * N, len(languages)) and np.allclose(p.sum(-1), 1.0) and set(LANGS) <= set(languages)


@pytest.mark.parametrize("model", ["desta2", "qwen-audio-chat"])
def test_logit_lens_with_layer_enrichment_seed_003(probe, model):
    record, results, arrays = probe(model, "logitlens:attribute=gender", "speech", "layer-enrich:layer=0,gap=1")
    assert record["interventions"][0]["params"]["layer"] == 0 and record["interventions"][0]["params"]["gap"] == 1
    for run in ("baseline", "intervened"):
        assert 0 <= results["summary"][f"accuracy ({run} @last)"] <= 1
        assert arrays[f"{run}/last/label_probs"].shape == (LAYERS, 3 * N, 2)
        assert arrays[f"{run}/last/information_score/all"].shape == (LAYERS,)
    # the edit adds layer 0's state to layer 1's output at the last position: the last layer's lens changes
    assert not np.allclose(arrays["baseline/last/label_probs"][1], arrays["intervened/last/label_probs"][1])
    np.testing.assert_allclose(arrays["baseline/last/label_probs"][0], arrays["intervened/last/label_probs"][0])
