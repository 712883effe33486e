"""Layer enrichment and audio masking as specs: parameters, calibration on a probing split, the random baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.collect import collect
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.spec import build_params, spec_to_json, split_spec
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.lens.audiolens import information_scores
from lalm_probe.plugins.analyses.lens.plugin import LogitLens
from lalm_probe.plugins.interventions.audio_mask import AudioMask
from lalm_probe.plugins.interventions.layer_enrich import LayerEnrich


def labelled(n: int) -> Dataset:
    """Items grouped by class, as SAKURA lists them: the first half female, the second male."""
    return Dataset([Stimulus(f"i{k}", audio=tone(100 + 23 * k, 0.3), sample_rate=SR,
                             labels={"gender": "female" if k < n // 2 else "male"}) for k in range(n)])


def test_cli_spec_round_trips_through_json():
    name, params = split_spec("layer-enrich:layer=3,gap=2,scale=0.5")
    spec = build_params(LayerEnrich, params, name)
    assert (spec.layer, spec.gap, spec.scale) == (3, 2, 0.5)
    again = build_params(LayerEnrich, spec_to_json(spec)["params"], name)
    assert again == spec


def test_layer_enrich_edit_targets_layer_plus_gap(qwen_session):
    spec = LayerEnrich(layer=1, gap=5, scale=0.3)
    assert spec.calibration(qwen_session.view, labelled(4), LogitLens()) is None  # a given layer needs no data
    (edit,) = spec.edits(qwen_session.view)
    assert (edit.site, edit.source, edit.scale, edit.op, edit.items) == ("lm.6.out", "lm.1.out@last", 0.3, "add", None)


def test_the_probing_split_is_seeded_and_stratified_and_the_same_for_method_and_baseline(qwen_session):
    ds = labelled(12)
    lens = LogitLens(attribute="gender", positions=["last"])
    score = LayerEnrich(gap=5, probe_size=4).calibration(qwen_session.view, ds, lens)
    assert sorted(it.labels["gender"] for it in score.items) == ["female", "female", "male", "male"]
    assert [it.id for it in score.evaluate] == [it.id for it in ds if it.id not in {i.id for i in score.items}]
    random = LayerEnrich(gap=5, probe_size=4, select="random").calibration(qwen_session.view, ds, lens)
    assert [it.id for it in random.evaluate] == [it.id for it in score.evaluate] and not random.requirements.reads()
    first = LayerEnrich(gap=5, probe_size=4, split="first").calibration(qwen_session.view, ds, lens)
    assert [it.id for it in first.items] == ["i0", "i1", "i2", "i3"]  # the old behaviour: one class only


def test_the_score_layer_is_the_best_information_score_among_wrong_probing_items(qwen_session, tmp_path):
    ds = labelled(10)
    lens = LogitLens(attribute="gender", positions=["last"], heatmap_items=0)
    spec = LayerEnrich(gap=5, probe_size=6)
    calibration = spec.calibration(qwen_session.view, ds, lens)
    store = collect(qwen_session, calibration.items, calibration.requirements.reads(), ActivationStore(tmp_path, {}),
                    prompt_fn=lambda it: lens.prompt(qwen_session.view, it))
    spec.calibrate(qwen_session.view, calibration, store, lens)
    # by hand: lens probabilities of the label tokens at every layer, scored on the wrongly predicted items
    model, view = qwen_session.plugin.model, qwen_session.view
    _, label_ids, targets = lens.label_spec(view, calibration.items)
    ids = [it.id for it in calibration.items]
    probs = []
    for layer in range(8):
        h = torch.tensor(store.array(f"lm.{layer}.out@last", ids)[:])
        with torch.no_grad():
            probs.append(torch.softmax(model.lm_head(model.model.language_model.norm(h)), -1)[:, label_ids].numpy())
    probs = np.stack(probs)
    wrong = probs[-1].argmax(-1) != targets
    use = wrong if wrong.any() else np.ones_like(wrong)
    assert spec.layer == int(np.argmax(information_scores(probs[:, use], targets[use])[:3]))


def test_the_random_baseline_draws_a_seeded_layer_per_item(qwen_session, tmp_path):
    ds = labelled(12)
    lens = LogitLens(attribute="gender")
    draws = []
    for seed in (0, 0, 1):
        spec = LayerEnrich(select="random", seed=seed, gap=5, probe_size=4)
        calibration = spec.calibration(qwen_session.view, ds, lens)
        spec.calibrate(qwen_session.view, calibration, ActivationStore(tmp_path / str(seed), {}), lens)
        draws.append(spec.random_layers)
    assert draws[0] == draws[1] != draws[2]
    assert set(draws[0]) == {it.id for it in calibration.evaluate} and set(draws[0].values()) <= {0, 1, 2}
    edits = spec.edits(qwen_session.view)
    by_layer = {e.source: set(e.items) for e in edits}
    assert sum(len(v) for v in by_layer.values()) == 8 and len(edits) == len(set(draws[2].values()))
    for e in edits:
        layer = int(e.source.split(".")[1])
        assert e.site == f"lm.{layer + 5}.out" and all(draws[2][i] == layer for i in e.items)


def test_layer_enrich_bad_parameters(qwen_session):
    with pytest.raises(UserError, match="gap 9"):
        LayerEnrich(layer=0, gap=9).calibration(qwen_session.view, labelled(2), LogitLens())
    with pytest.raises(UserError, match="logitlens:label"):
        LayerEnrich(probe_size=1).calibration(qwen_session.view, labelled(4), LogitLens())
    with pytest.raises(UserError, match="more than probe_size"):
        LayerEnrich(probe_size=100).calibration(qwen_session.view, labelled(4), LogitLens(label="gender"))
    with pytest.raises(UserError, match="select must be"):
        LayerEnrich(select="best")


def test_audio_mask_blocks_every_layer_by_default(qwen_session):
    edits = AudioMask().edits(qwen_session.view)
    assert [e.site for e in edits] == [f"lm.{i}.attn" for i in range(8)]
    assert all(e.op == "block_attention" and e.keys == "audio" and e.positions == "last" for e in edits)
    assert len(AudioMask(layers=[2, 3]).edits(qwen_session.view)) == 2
