"""Sweeps: list-valued intervention parameters expand into variants that one run collects and one analysis reads
(AudioLens Fig. 5: accuracy over λ for the method and random layers, mean ± std over seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lalm_probe.core.cli import main
from lalm_probe.core.errors import UserError
from lalm_probe.core.registry import discover
from lalm_probe.core.sweep import Variant, expand, sweep_table

TINY = ["--model", "qwen2audio", "--checkpoint", "tiny"]


@pytest.fixture(scope="module")
def registry():
    return discover()


def test_list_values_of_scalar_parameters_expand_into_variants(registry):
    variants = expand(registry, ["layer-enrich:layer=1,scale=[0,0.5,1],gap=[2,3]"])
    assert [v.params for v in variants] == [{"scale": s, "gap": g} for s in (0.0, 0.5, 1.0) for g in (2, 3)]
    assert variants[1].name == "scale=0.0, gap=3" and variants[1].interventions[0].gap == 3
    (plain,) = expand(registry, ["layer-enrich:layer=1", "audio-mask:layers=[2,3]"])  # a list-typed value
    assert plain.params == {} and plain.interventions[1].layers == [2, 3]
    twice = expand(registry, ["layer-enrich:layer=1,scale=[1,2]", "layer-enrich:layer=2,scale=[3,4]"])
    assert len(twice) == 4 and set(twice[0].params) == {"layer-enrich.scale"}  # named apart when ambiguous
    assert expand(registry, [{"name": "layer-enrich", "params": {"layer": 1, "scale": [0.5, 1]}}])[1].params == {
        "scale": 1.0}  # a JSON spec's list
    with pytest.raises(UserError, match="expected float"):
        expand(registry, ["layer-enrich:scale=[0,big]"])


def test_the_random_layer_baseline_repeats_over_five_seeds_unless_told(registry):
    assert [v.params for v in expand(registry, ["layer-enrich:select=random"])] == [{"seed": s} for s in range(5)]
    assert len(expand(registry, ["layer-enrich:select=random,seed=3"])) == 1
    both = expand(registry, ["layer-enrich:select=[score,random],scale=[1,2]"])
    assert len(both) == 2 * 2 * 5 and {v.params["seed"] for v in both} == set(range(5))
    assert len(expand(registry, ["layer-enrich:scale=[1,2]"])) == 2  # the method alone: no repeats


def test_sweep_table_means_and_spreads_over_seeds():
    variants = [Variant(f"{sel}-{s}-{k}", {"select": sel, "scale": s, "seed": k}, [])
                for sel in ("score", "random") for s in (0.0, 1.0) for k in range(3)]
    values = {v.name: (0.5 + v.params["scale"] * (0.2 if v.params["select"] == "score" else 0.1 * v.params["seed"]))
              for v in variants}
    (per, over), fig = sweep_table(values, variants, "accuracy", reference=0.5)
    assert len(per.rows) == 12 and per.rows[0] == {"select": "score", "scale": 0.0, "seed": 0, "accuracy": 0.5}
    assert over.title == "accuracy over scale (mean ± std over seed)"
    row = next(r for r in over.rows if r["select"] == "random" and r["scale"] == 1.0)
    assert row["accuracy mean"] == pytest.approx(np.mean([0.5, 0.6, 0.7]))
    assert row["accuracy std"] == pytest.approx(np.std([0.5, 0.6, 0.7])) and row["repeats"] == 3
    assert fig is not None


def test_one_run_collects_every_variant_and_the_lens_reports_accuracy_over_the_sweep(capsys, tmp_path,
                                                                                     gender_manifest):
    out = tmp_path / "sweep"
    spec = "layer-enrich:probe_size=4,gap=2,scale=[0,2],select=[score,random],seed=[0,1]"
    code = main(["run", *TINY, "--analysis", "logitlens:attribute=gender,positions=[last],heatmap_items=0",
                 "--data", str(gender_manifest), "--intervention", spec, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    sweep = record["sweep"]
    assert sweep["params"] == ["scale", "select", "seed"] and len(sweep["variants"]) == 8
    layers = {v["interventions"][0]["params"]["layer"] for v in sweep["variants"] if v["params"]["select"] == "score"}
    assert len(layers) == 1  # one calibration, read by every variant of the method
    assert record["dataset"]["evaluated_items"] == 8  # the same 8 evaluation items for every variant
    assert len(list(out.glob("store/calibration-*"))) == 1
    # the method ignores the seed: its two seeds share one collection; random layers differ per seed
    assert len(set(record["stores"]["variants"].values())) == 2 + 4
    results = json.loads((out / "results.json").read_text())
    per = next(t for t in results["tables"] if t["title"] == "accuracy per variant")["rows"]
    over = next(t for t in results["tables"] if t["title"].startswith("accuracy over scale"))["rows"]
    assert {(r["select"], r["scale"]) for r in over} == {(s, x) for s in ("score", "random") for x in (0.0, 2.0)}
    assert all(r["repeats"] == 2 for r in over)
    base = results["summary"]["accuracy (baseline @last)"]
    assert all(r["accuracy"] == pytest.approx(base) for r in per if r["scale"] == 0.0)  # λ = 0 is the model itself
    assert (out / "plots/sweep_accuracy.png").stat().st_size > 10_000
    # probe analyze reads every variant's store again, without calibrating or collecting anything
    stores = sorted(str(p) for p in out.glob("store/**/segments/*"))
    assert main(["analyze", str(out), "--analysis", "logitlens:attribute=gender,positions=[last],heatmap_items=0"]) == 0
    again = json.loads((out / "analyses/logitlens/results.json").read_text())
    assert next(t for t in again["tables"] if t["title"] == "accuracy per variant")["rows"] == per
    assert sorted(str(p) for p in out.glob("store/**/segments/*")) == stores
