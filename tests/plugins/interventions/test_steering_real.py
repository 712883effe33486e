"""Steering and patching real Whisper base (offline weights) where it identifies the language.

With no language forced, Whisper's decoder reads ``<|startoftranscript|>`` alone and detects the language as the
most probable language token there (``detect_language``): that position is step 1 of the decision, and the last
layer's lens of it is the model's own output. The tests read the detected language from it (``generate`` detects
it the same way, under the same edits).

Figures are printed (``pytest -s``) and asserted with margins. They skip without the weight packages or espeak-ng.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from lalm_probe.core.cli import main

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def base(whisper_base):
    return whisper_base


def _synth(query: str):
    from lalm_probe.plugins.datasets.synth import synth_source

    return synth_source(query)


def detected(session, items, edits=()) -> list[str]:
    """Whisper's detected language per clip under ``edits``: the most probable language token at
    <|startoftranscript|>, from the last decoder layer's lens (the model's own logits)."""
    gen = session.plugin.model.generation_config
    codes, ids = zip(*[(tok[2:-2], i) for tok, i in gen.lang_to_id.items()])
    out = []
    for start in range(0, len(items), 10):
        h = session.run(items[start:start + 10], ["decoder.5.out"], ["last"], edits=edits)["decoder.5.out@last"]
        logits = session.view.lens(h, "decoder", True, 5)[:, list(ids)]
        out += [codes[j] for j in logits.argmax(-1).tolist()]
    return out


def test_a_mean_difference_vector_moves_the_detected_language(base, tmp_path):
    from lalm_probe.core.collect import collect
    from lalm_probe.core.store import ActivationStore
    from lalm_probe.plugins.analyses.lens.plugin import LogitLens
    from lalm_probe.plugins.interventions.steer import Steer

    fit = _synth("parallel?languages=en,de&voices=m1,f2&sentences=s01,s02&text=no")  # the vector's clips
    test = _synth("parallel?languages=fr,es,ja,zh,id&voices=m1&sentences=s03,s04&text=no").items  # other languages
    spec = Steer(label="language", target="de", baseline="en", site="decoder.2.out", read="last", split="all")
    calibration = spec.calibration(base.view, fit, LogitLens())
    store = collect(base, calibration.items, calibration.requirements.reads(), ActivationStore(tmp_path, {}))
    spec.calibrate(base.view, calibration, store, LogitLens())
    rates, langs = {}, {}
    for scale in (0.0, 1.0, 2.0):
        langs[scale] = detected(base, test, replace(spec, scale=scale).edits(base.view))
        rates[scale] = float(np.mean([lang == "de" for lang in langs[scale]]))
    steered = replace(spec, scale=2.0).edits(base.view)
    outputs = [o for start in range(0, len(test), 10) for o in base.generate(test[start:start + 10], 1,
                                                                             edits=steered).outputs]
    assert [o["language"] for o in outputs] == langs[2.0]  # generate detects under the same edits
    control = replace(spec, vector=None, control="random", seed=0)
    control.calibrate(base.view, calibration, store, LogitLens())
    found = detected(base, test, replace(control, scale=2.0).edits(base.view))
    rates["random x2"] = float(np.mean([lang == "de" for lang in found]))
    print(f"\nsteer de-en at decoder.2.out (|v| = {spec.norm:.2f}), share of {len(test)} fr/es/ja/zh/id clips "
          f"detected as de: {rates}")
    assert np.linalg.norm(control.vector) == pytest.approx(spec.norm, rel=1e-5)
    assert rates[0.0] <= 0.2  # unsteered, these clips are rarely taken for German
    assert rates[0.0] <= rates[1.0] <= rates[2.0] and rates[2.0] >= 0.8  # the effect grows with the scale
    assert rates["random x2"] <= rates[0.0] + 0.1  # and is absent for a random vector of the same norm


def test_a_patching_sweep_over_decoder_layers_shows_where_the_language_is_decided(base, tmp_path, capsys):
    out = tmp_path / "patch"
    code = main(["run", "--model", "whisper", "--analysis", "patching:label=language", "--no-baseline",
                 "--data", "synth:parallel?languages=en,de,fr&voices=m1&sentences=s01,s02&text=no",
                 "--intervention", "patch:source_where=language:en,sweep=true", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    arrays = np.load(out / "arrays.npz")
    effect, moved = arrays["effect/out"][:, 0], arrays["moved/out"][:, 0]
    summary = json.loads((out / "results.json").read_text())["summary"]
    with capsys.disabled():
        print(f"\npatching en -> de/fr at <|startoftranscript|>, per decoder layer 0..5 (4 pairs): normalised effect "
              f"{np.round(effect, 2).tolist()}, detected as the source's language {np.round(moved, 2).tolist()}; "
              f"decided from layer {summary['decided from layer (out @last; the tool' + chr(39) + 's summary)']}")
    assert effect[-1] == pytest.approx(1.0, abs=1e-3)  # the last layer's state is the output
    assert moved[-1] >= 0.75 and moved[0] <= 0.25  # early states are recomputed from the clip's own audio
    assert np.corrcoef(np.arange(6), effect)[0, 1] > 0.7  # the decision builds up with depth
