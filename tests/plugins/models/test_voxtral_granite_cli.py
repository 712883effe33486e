"""Voxtral and Granite Speech from the command line: listed, described with their checkpoints, and run end to end
with the logit lens and clusters on a manifest of wav files."""

from __future__ import annotations

import importlib.util
import json

import pytest
from lalm_probe.core.cli import main

MODELS = [pytest.param("voxtral", marks=pytest.mark.skipif(importlib.util.find_spec("mistral_common") is None,
                                                            reason="needs the voxtral extra")), "granite-speech"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_list_shows_both_models(capsys):
    code, out = cli(capsys, "list")
    assert code == 0 and "voxtral" in out and "granite-speech" in out


@pytest.mark.parametrize("name, checkpoints, stacks", [
    ("voxtral", ["mistralai/Voxtral-Mini-3B-2507", "mistralai/Voxtral-Small-24B-2507"], ["audio_encoder", "lm"]),
    ("granite-speech", ["ibm-granite/granite-speech-3.3-2b", "ibm-granite/granite-speech-3.3-8b"],
     ["audio_encoder", "projector", "lm", "lora"]),
])
def test_info_lists_the_published_checkpoints_and_stacks(capsys, name, checkpoints, stacks):
    if name == "voxtral":
        pytest.importorskip("mistral_common")
    code, out = cli(capsys, "info", "--model", name, "--checkpoint", "tiny", "--json")
    about = json.loads(out[out.index("{"):])
    assert code == 0 and set(checkpoints) <= set(about["checkpoints"]) and list(about["stacks"]) == stacks


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("analysis, result", [("logitlens:attribute=gender", "accuracy (baseline @last)"),
                                              ("clusters:labels=[gender]", None)])
def test_run_from_the_cli_writes_a_complete_run(capsys, tmp_path, gender_manifest, name, analysis, result):
    out = tmp_path / "run"
    code, text = cli(capsys, "run", "--model", name, "--checkpoint", "tiny", "--analysis", analysis,
                     "--data", str(gender_manifest), "--out", str(out), "--batch-size", "4")
    assert code == 0, text
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert result is None or 0 <= summary[result] <= 1
    assert list((out / "plots").glob("*.png"))
