"""``neurons`` from the CLI on every current audio-language model's tiny instance (issue 16's models): the analysis
reads the canonical sites, so it needs nothing per model. Each run ranks every unit of the LM at decode step 1."""

from __future__ import annotations

import csv
import json

import pytest
from lalm_probe.core.cli import main

MODELS = ["qwen2.5-omni", "qwen3-omni", "voxtral", "granite-speech", "audioflamingo3", "phi4-multimodal", "gemma3n"]
K = 3


@pytest.mark.parametrize("name", MODELS)
def test_neurons_ranks_every_lm_unit_of_each_model(name, capsys, tmp_path, gender_manifest):
    out = tmp_path / name
    code = main(["run", "--model", name, "--checkpoint", "tiny", "--analysis",
                 f"neurons:label=gender,stacks=[lm],steps=[1],k={K}", "--data", str(gender_manifest),
                 "--out", str(out), "--batch-size", "6"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    table = out / "expertise" / "gender=male" / "speech"
    rows = list(csv.DictReader((table / "step1.csv").open()))
    assert rows and all(0.0 <= float(r["ap"]) <= 1.0 for r in rows)
    assert {r["stack"] for r in rows} == {"lm"} and len({(r["site"], r["unit"]) for r in rows}) == len(rows)
    top = list(csv.DictReader((table / f"step1.top{K}.csv").open()))
    assert len(top) == K and float(top[0]["ap"]) == max(float(r["ap"]) for r in rows)


def test_any_component_of_the_vocabulary_can_be_ranked(capsys, tmp_path, gender_manifest):
    """Beyond seed 002's groups: Qwen3-Omni's router logits and one expert's hidden units."""
    out = tmp_path / "experts"
    code = main(["run", "--model", "qwen3-omni", "--checkpoint", "tiny", "--analysis",
                 "neurons:label=gender,stacks=[lm],steps=[1],k=2,components=[moe_router,expert0_act]",
                 "--data", str(gender_manifest), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "expertise" / "gender=male" / "speech" / "step1.csv").open()))
    assert {r["site"].split(".")[-1] for r in rows} == {"moe_router", "expert0_act"}
    assert main(["run", "--model", "qwen3-omni", "--checkpoint", "tiny", "--analysis",
                 "neurons:components=[mlp_activation]", "--data", str(gender_manifest), "--out",
                 str(tmp_path / "bad")]) == 2
    assert "unknown component(s) ['mlp_activation']" in capsys.readouterr().err
