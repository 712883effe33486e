"""Seed 002 end to end from the CLI on the tiny SeamlessM4T v2: neurons (S2T and T2T) writes expertise tables
whose AP equals sklearn on the stored responses, median-patch reads them back, generate scores the outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.store import ActivationStore
from sklearn.metrics import average_precision_score

LANGUAGES = {"en": "the cat sleeps", "de": "die Katze schläft", "fr": "le chat dort"}
MODEL = ["--model", "seamless-m4t-v2", "--checkpoint", "tiny"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two speech and two text items per language, with transcripts as references."""
    root = tmp_path_factory.mktemp("neurons-data")
    lines = []
    for n, (lang, text) in enumerate(LANGUAGES.items()):
        for k in range(2):
            sf.write(root / f"{lang}{k}.wav", tone(110 + 60 * n + 17 * k, 0.4 + 0.1 * k), SR)
            lines.append({"id": f"{lang}{k}-speech", "audio": f"{lang}{k}.wav",
                          "labels": {"language": lang, "transcript": text}})
            lines.append({"id": f"{lang}{k}-text", "text": f"{text} {k}", "labels": {"language": lang,
                                                                                    "transcript": text}})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def neurons_run(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("neurons") / "run"
    code = main(["run", *MODEL, "--data", str(manifest), "--out", str(out), "--analysis",
                 "neurons:k=4,steps=[1,2],stacks=[speech_encoder,text_encoder,text_decoder]"])
    assert code == 0
    return out


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tables_per_value_modality_and_step_hold_sklearn_ap(neurons_run):
    for lang in LANGUAGES:
        for modality, stacks in (("speech", {"speech_encoder", "text_decoder"}), ("text", {"text_encoder",
                                                                                           "text_decoder"})):
            for step in ("step1", "step2"):
                table = rows(neurons_run / "expertise" / f"language={lang}" / modality / f"{step}.csv")
                assert {r["stack"] for r in table} == stacks
                top = rows(neurons_run / "expertise" / f"language={lang}" / modality / f"{step}.top4.csv")
                assert len(top) == 4 * len(stacks)
                for stack in stacks:
                    best = max(float(r["ap"]) for r in table if r["stack"] == stack)
                    assert max(float(r["ap"]) for r in top if r["stack"] == stack) == best
                assert len(rows(neurons_run / "expertise" / f"language={lang}" / modality / f"{step}.both8.csv")) \
                    == 8 * len(stacks)
    # one decoder unit at step 2 and one encoder unit, by hand from the store: sklearn's AP, NumPy's median
    record = json.loads((neurons_run / "run.json").read_text())
    store = ActivationStore.open(neurons_run / record["stores"]["baseline"])
    ids = [f"{lang}{k}-text" for lang in LANGUAGES for k in range(2)]
    y = np.array([i.startswith("de") for i in ids])
    table = rows(neurons_run / "expertise" / "language=de" / "text" / "step2.csv")
    for site, key in (("text_decoder.1.mlp_up", "text_decoder.1.mlp_up@step:2"),
                      ("text_encoder.0.attn_q", "text_encoder.0.attn_q@mean")):
        x = store.array(key, ids)[:]
        row = next(r for r in table if r["site"] == site and r["unit"] == "3")
        assert float(row["ap"]) == pytest.approx(average_precision_score(y, x[:, 3]), abs=1e-12)
        assert float(row["on_p50"]) == pytest.approx(float(np.median(x[y, 3])), rel=1e-6)


def test_speech_and_text_selections_are_compared(neurons_run):
    result = json.loads((neurons_run / "results.json").read_text())
    overlap = next(t for t in result["tables"] if t["title"].startswith("Speech x text overlap of the selections "
                                                                       "@step:1"))
    assert [r["kind"] for r in overlap["rows"]] == ["top", "bottom", "both"]
    assert all(r["permutations"] == 6 and 0 < r["permutation p"] <= 1 for r in overlap["rows"])  # 3! matchings
    assert any(k.startswith("AP Spearman diagonal concentration @step:2") for k in result["summary"])
    assert (neurons_run / "plots" / "placement_baseline_speech_step1_text_decoder.png").is_file()


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_median_patch_reads_the_run_and_generate_scores_the_outputs(neurons_run, manifest, tmp_path, modality):
    out = tmp_path / "patched"
    code = main(["run", *MODEL, "--data", str(manifest), "--out", str(out), "--analysis",
                 "generate:max_new_tokens=3,target=de,reference=transcript", "--intervention",
                 f"median-patch:table={neurons_run},value=de,modality={modality},position=step:1,k=4"])
    assert code == 0
    record = json.loads((out / "run.json").read_text())
    units = record["interventions"][0]["params"]["units"]
    table = rows(neurons_run / "expertise" / "language=de" / modality / "step1.top4.csv")
    assert sorted((s, u) for s, pairs in units.items() for u, _ in pairs) == sorted(
        (r["site"], int(r["unit"])) for r in table)
    assert all(v == float(next(r["on_p50"] for r in table if r["site"] == s and int(r["unit"]) == u))
               for s, pairs in units.items() for u, v in pairs)
    metrics = next(t for t in json.loads((out / "results.json").read_text())["tables"]
                   if t["title"] == "Steering metrics toward de")
    assert {(r["run"], r["modality"]) for r in metrics["rows"]} == {
        (run, m) for run in ("baseline", "intervened") for m in ("speech", "text")}
    assert all(0 <= r["control rate"] <= 1 and "bleu" in r for r in metrics["rows"])
    assert len((out / "outputs.jsonl").read_text().splitlines()) == 12
