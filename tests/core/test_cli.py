"""The probe CLI end to end on the tiny model, and every bad-input case: one line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from lalm_probe.core.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_list_shows_every_kind(capsys):
    code, out = run_cli(capsys, "list")
    assert code == 0 and "qwen2audio" in out and "logitlens" in out and "layer-enrich" in out
    code, out = run_cli(capsys, "list", "--json")
    models = {m["model"]: m for m in json.loads(out)["models"]}
    assert models["seamless-m4t-v2"]["stacks"] == "speech_encoder, speech_adaptor, text_encoder, text_decoder, cross_kv"
    assert models["whisper"]["default weights"] == "offline:base"  # every model says where its weights come from
    assert all(m["stacks"] and m["default weights"] for m in models.values())
    from lalm_probe.core.registry import discover

    registry = discover()
    for name in ("granite-speech", "phi4-multimodal", "whisper"):  # what a loaded model has, listed without loading
        loaded = registry.get("model", name).load("tiny")
        assert models[name]["stacks"].replace(" (at load)", "").split(", ") == list(loaded.resolved)


def test_a_closed_pipe_ends_the_listing_quietly():
    listing = subprocess.Popen([sys.executable, "-m", "lalm_probe.core.cli", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    listing.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    assert listing.wait(timeout=120) == 0
    assert b"Traceback" not in listing.stderr.read()


def test_info_shows_stacks_and_sites(capsys):
    code, out = run_cli(capsys, "info", "--model", "qwen2audio", "--checkpoint", "tiny")
    assert code == 0 and "audio_encoder" in out and "lm" in out and "attn_norm" in out
    assert "options (--model qwen2audio:option=value,...)" in out and "false: the input without the chat" in out


def test_every_model_option_says_what_it_does():
    from lalm_probe.core.registry import discover

    registry = discover()
    for name in registry.names("model"):
        cls = registry.entries["model"][name].obj
        assert set(cls.option_help) == set(cls.option_defaults), name


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


def test_console_script_prints_no_traceback_for_user_errors():
    proc = subprocess.run([sys.executable, "-m", "lalm_probe.core.cli", "run", "--model", "nope", "--analysis", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr
