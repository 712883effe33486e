"""Layer enrichment and audio masking as specs: parameters, layer choice, random baseline."""

from __future__ import annotations

import pytest

from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.spec import build_params, spec_to_json, split_spec
from lalm_probe.plugins.analyses.logitlens import LogitLens
from lalm_probe.plugins.interventions.audio_mask import AudioMask
from lalm_probe.plugins.interventions.layer_enrich import LayerEnrich

from helpers import SR, tone


def labelled(n: int) -> Dataset:
    return Dataset([Stimulus(f"i{k}", audio=tone(100 + 23 * k, 0.3), sample_rate=SR,
                             labels={"gender": "male" if k % 2 else "female"}) for k in range(n)])


def test_cli_spec_round_trips_through_json():
    name, params = split_spec("layer-enrich:layer=3,gap=2,scale=0.5")
    spec = build_params(LayerEnrich, params, name)
    assert (spec.layer, spec.gap, spec.scale) == (3, 2, 0.5)
    again = build_params(LayerEnrich, spec_to_json(spec)["params"], name)
    assert again == spec


def test_layer_enrich_edit_targets_layer_plus_gap(qwen_session):
    spec = LayerEnrich(layer=1, gap=5, scale=0.3)
    spec.prepare(qwen_session, labelled(4), LogitLens())
    (edit,) = spec.edits(qwen_session)
    assert (edit.site, edit.source, edit.scale, edit.op) == ("lm.6.out", "lm.1.out@last", 0.3, "add")


def test_layer_enrich_chooses_layer_from_probing_split_and_evaluates_on_the_rest(qwen_session):
    ds = labelled(10)
    lens = LogitLens(attribute="gender", positions=["last"])
    spec = LayerEnrich(gap=5, probe_size=4)
    test = spec.prepare(qwen_session, ds, lens)
    assert [it.id for it in test] == [f"i{k}" for k in range(4, 10)]
    assert 0 <= spec.layer < 3  # 8 layers, gap 5 -> l in 0..2


def test_random_layer_baseline_is_seeded_and_in_range(qwen_session):
    layers = []
    for seed in range(5):
        spec = LayerEnrich(select="random", seed=seed, gap=5)
        spec.prepare(qwen_session, labelled(2), LogitLens())
        layers.append(spec.layer)
        again = LayerEnrich(select="random", seed=seed, gap=5)
        again.prepare(qwen_session, labelled(2), LogitLens())
        assert again.layer == spec.layer
    assert all(0 <= layer <= 2 for layer in layers)


def test_layer_enrich_bad_parameters(qwen_session):
    with pytest.raises(UserError, match="gap 9"):
        LayerEnrich(layer=0, gap=9).prepare(qwen_session, labelled(2), LogitLens())
    with pytest.raises(UserError, match="label"):
        LayerEnrich(probe_size=1).prepare(qwen_session, labelled(4), LogitLens())
    with pytest.raises(UserError, match="more than probe_size"):
        LayerEnrich(probe_size=100).prepare(qwen_session, labelled(4), LogitLens(label="gender"))


def test_audio_mask_blocks_every_layer_by_default(qwen_session):
    edits = AudioMask().edits(qwen_session)
    assert [e.site for e in edits] == [f"lm.{i}.attn" for i in range(8)]
    assert all(e.op == "block_attention" and e.keys == "audio" and e.positions == "last" for e in edits)
    assert len(AudioMask(layers=[2, 3]).edits(qwen_session)) == 2
