"""The probe CLI end to end on the tiny model, and every bad-input case: one line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lalm_probe.core.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_list_shows_every_kind(capsys):
    code, out = run_cli(capsys, "list")
    assert code == 0 and "qwen2audio" in out and "logitlens" in out and "layer-enrich" in out


def test_info_shows_stacks_and_sites(capsys):
    code, out = run_cli(capsys, "info", "--model", "qwen2audio", "--checkpoint", "tiny")
    assert code == 0 and "audio_encoder" in out and "lm" in out and "attn_norm" in out


def test_run_logitlens_writes_a_complete_run_directory(capsys, tmp_path, gender_manifest):
    out = tmp_path / "run"
    code, text = run_cli(capsys, "run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis",
                         "logitlens:attribute=gender,prompt_format=mc", "--data", str(gender_manifest),
                         "--out", str(out), "--batch-size", "5")
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["versions"]["nnsight"]
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["summary"]["accuracy (baseline @last)"] <= 1
    arrays = np.load(out / "arrays.npz")
    assert arrays["baseline/last/label_probs"].shape == (8, 12, 2)
    assert (out / "plots" / "information_score_baseline_last.png").stat().st_size > 1000
    assert list((out / "plots").glob("heatmap_*.png"))
    assert "accuracy" in text  # the rich summary table was printed


def test_run_with_interventions_saves_specs_and_both_stores(capsys, tmp_path, gender_manifest):
    out = tmp_path / "run"
    spec = tmp_path / "mask.json"
    spec.write_text(json.dumps({"name": "audio-mask", "params": {"layers": [0, 1, 2]}}))
    code, text = run_cli(capsys, "run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis",
                         "logitlens:attribute=gender", "--data", str(gender_manifest), "--out", str(out),
                         "--intervention", "layer-enrich:layer=1,gap=5,scale=2.0", "--intervention", str(spec))
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["interventions"][0] == {"name": "layer-enrich", "params": {
        "layer": 1, "gap": 5, "scale": 2.0, "select": "score", "seed": 0, "probe_size": 100, "split": "stratified",
        "split_seed": 0, "position": "last", "stack": None, "random_layers": None}}
    assert set(record["stores"]) == {"baseline", "intervened"}
    assert record["interventions"][1]["params"]["layers"] == [0, 1, 2]
    results = json.loads((out / "results.json").read_text())
    assert "accuracy (intervened @last)" in results["summary"]
    arrays = np.load(out / "arrays.npz")
    assert not np.allclose(arrays["baseline/last/label_probs"], arrays["intervened/last/label_probs"])


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "qwen2audo", "--analysis", "logitlens"], "Did you mean 'qwen2audio'"),
    (["run", "--model", "qwen2audio", "--analysis", "logitlense"], "Unknown analysis 'logitlense'"),
    (["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens", "--data", "DATA",
      "--intervention", "layer-enrich:layer=99"], "layer 99 is out of range"),
    (["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens", "--data", "DATA",
      "--intervention", "layer-enrich:scale=big"], "expected float, got 'big'"),
    (["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens", "--data", "DATA",
      "--intervention", "audio-mas"], "Did you mean 'audio-mask'"),
    (["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens:label=emotion",
      "--data", "DATA"], "has no label 'emotion'"),
    (["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens:colour=red",
      "--data", "DATA"], "unknown parameter"),
    (["run", "--model", "qwen2audio", "--analysis", "logitlens", "--data", "/no/such/manifest.jsonl"],
     "manifest not found"),
    (["run", "--model", "qwen2audio", "--checkpoint", "/no/such/dir", "--analysis", "logitlens", "--data", "DATA"],
     "Checkpoint directory '/no/such/dir' does not exist"),
])
def test_user_errors_exit_2_with_one_line(capsys, tmp_path, gender_manifest, argv, message):
    argv = [str(gender_manifest) if a == "DATA" else a for a in argv]
    code, text = run_cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 2 and message in text and "Traceback" not in text
    assert text.count("error:") == 1


def _manifest(tmp_path, audio_name: str) -> str:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "bad", "audio": audio_name, "labels": {"gender": "male"}}) + "\n")
    return str(path)


@pytest.mark.parametrize("content, message", [
    (None, "audio file not found"), (b"this is not audio", "cannot decode audio file"), (b"", "cannot decode"),
])
def test_missing_or_corrupt_audio_names_the_file(capsys, tmp_path, content, message):
    if content is not None:
        (tmp_path / "x.wav").write_bytes(content)
    code, text = run_cli(capsys, "run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens",
                         "--data", _manifest(tmp_path, "x.wav"), "--out", str(tmp_path / "run"))
    assert code == 2 and message in text and "x.wav" in text
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and not (tmp_path / "run" / "results.json").exists()


def test_empty_audio_file_is_reported(capsys, tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "x.wav", np.zeros(0, dtype=np.float32), 16000)
    code, text = run_cli(capsys, "run", "--model", "qwen2audio", "--checkpoint", "tiny", "--analysis", "logitlens",
                         "--data", _manifest(tmp_path, "x.wav"), "--out", str(tmp_path / "run"))
    assert code == 2 and "audio is empty" in text


def test_console_script_prints_no_traceback_for_user_errors():
    proc = subprocess.run([sys.executable, "-m", "lalm_probe.core.cli", "run", "--model", "nope", "--analysis", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr
