"""``probe collate`` over run folders: AudioLens Table II (means over prompt formats) and Table III (Pearson r and p
between critical layer and accuracy across attributes and prompt formats, per model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lalm_probe.core.cli import main
from lalm_probe.core.collate import collate, load_runs
from lalm_probe.core.errors import UserError
from scipy import stats

ATTRS, FORMATS = ("gender", "language", "emotion", "animal"), ("direct", "qa", "mc")


def fake_runs(tmp_path, model="desta2", seed=0):
    rng = np.random.default_rng(seed)
    folders, truth = [], []
    for a in ATTRS:
        for f in FORMATS:
            crit, acc = 20 + 10 * rng.random(), rng.random()
            if a == "animal" and f == "qa":
                crit = None  # no layer cleared the threshold
            folder = tmp_path / f"{model}-{a}-{f}"
            folder.mkdir()
            (folder / "run.json").write_text(json.dumps({
                "status": "complete", "config": {"model": f"{model}:chat_template=true", "checkpoint": None},
                "analysis": {"name": "logitlens", "params": {"attribute": a, "prompt_format": f}}}))
            (folder / "results.json").write_text(json.dumps({"summary": {
                "stack": "lm", "critical_layer (baseline @last)": crit, "accuracy (baseline @last)": acc,
                "critical_layer (baseline @token:-2)": 0.0, "accuracy (baseline @token:-2)": 0.0}}))
            folders.append(folder)
            truth.append((a, f, np.nan if crit is None else crit, acc))
    return folders, truth


def test_table_two_means_over_prompt_formats(tmp_path):
    folders, truth = fake_runs(tmp_path)
    rows = collate(load_runs(folders), ["model", "attribute"], ["critical_layer", "accuracy"], [])
    assert [r["attribute"] for r in rows] == list(ATTRS) and all(r["model"] == "desta2" for r in rows)
    for row in rows:
        mine = [t for t in truth if t[0] == row["attribute"]]
        assert row["runs"] == 3
        assert row["accuracy"] == pytest.approx(np.mean([t[3] for t in mine]))  # the @last entry: listed first
        assert row["critical_layer"] == pytest.approx(np.nanmean([t[2] for t in mine]))
    assert rows[-1]["critical_layer: runs without a value"] == 1


def test_table_three_pearson_per_model_and_excluding_an_attribute(tmp_path):
    folders, truth = fake_runs(tmp_path)
    (row,) = collate(load_runs(folders), ["model"], [], ["critical_layer", "accuracy"])
    ok = [t for t in truth if np.isfinite(t[2])]
    r, p = stats.pearsonr([t[2] for t in ok], [t[3] for t in ok])
    assert (row["pairs"], row["pearson_r"], row["p_value"]) == (11, pytest.approx(r), pytest.approx(p))
    (ex,) = collate(load_runs(folders), ["model"], [], ["critical_layer", "accuracy"], ["attribute!=gender"])
    ok = [t for t in truth if np.isfinite(t[2]) and t[0] != "gender"]
    assert ex["pairs"] == 8 and ex["pearson_r"] == pytest.approx(stats.pearsonr([t[2] for t in ok],
                                                                                [t[3] for t in ok])[0])


def test_the_cli_prints_and_writes_the_table(tmp_path, capsys):
    folders, _ = fake_runs(tmp_path)
    out = tmp_path / "table3.json"
    code = main(["collate", *map(str, folders), "--by", "model", "--correlate", "critical_layer,accuracy",
                 "--where", "attribute!=gender", "--out", str(out)])
    assert code == 0 and "pearson_r" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"][0]["runs"] == 9
    assert main(["collate", str(tmp_path / "desta2-*"), "--by", "attribute", "--mean", "accuracy"]) == 0  # a pattern
    assert "emotion" in capsys.readouterr().out
    assert main(["collate", str(folders[0]), "--mean", "nothing"]) == 2
    assert "no summary entry 'nothing'" in capsys.readouterr().err
    assert main(["collate", str(tmp_path / "missing"), "--mean", "accuracy"]) == 2
    with pytest.raises(UserError, match="no setting 'voice'"):
        collate(load_runs(folders), ["voice"], ["accuracy"], [])


def test_a_json_object_parameter_keeps_its_commas():
    from lalm_probe.core.spec import split_spec

    name, params = split_spec('svcca:levels={"en":"high","de":"low"},equal_n=true')
    assert name == "svcca" and params == {"levels": '{"en":"high","de":"low"}', "equal_n": "true"}
