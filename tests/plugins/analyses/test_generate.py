"""generate's steering metrics on planted outputs: control rate per run and modality, the cross-modal effect ratio
of the intervened run, language ID and BLEU, all from the stored outputs."""

from __future__ import annotations

import pytest
from helpers import stub_view
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.outputs import OutputStore
from lalm_probe.core.plugin import Stores
from lalm_probe.plugins.analyses.generate import Generate

# id -> (modality, baseline output, intervened output, reference)
PLANTED = {
    "s1": ("speech", "the cat sleeps", "猫 が 寝て いる", "猫が寝ている"),
    "s2": ("speech", "a dog runs", "犬 runs", "犬が走る"),
    "t1": ("text", "the cat sleeps", "the 猫 sleeps", "猫が寝ている"),
    "t2": ("text", "a dog runs", "a dog runs", "犬が走る"),
}


def stores(tmp_path) -> Stores:
    out = {}
    for n, name in enumerate(("baseline", "intervened")):
        store = OutputStore(tmp_path / f"{name}.jsonl")
        store.add([{"id": i, "output": row[1 + n]} for i, row in PLANTED.items()])
        store.mark_complete(list(PLANTED))
        out[name] = store
    return Stores(baseline_outputs=out["baseline"], intervened_outputs=out["intervened"])


def dataset() -> Dataset:
    return Dataset([Stimulus(i, text="x", labels={"modality": m, "reference": ref}) for i, (m, _, _, ref)
                    in PLANTED.items()])


def test_control_rate_per_run_and_modality_and_the_effect_ratio(tmp_path):
    result = Generate(target="ja", reference="reference", tokens="whitespace").analyze(
        stub_view({"lm": 2}), dataset(), stores(tmp_path))
    rows = {(r["run"], r["modality"]): r for r in result.tables[-1].rows}
    # whitespace tokens, Latin vs CJK among pure tokens: speech 4 CJK of 4 and 1 of 2; text 1 of 3 and 0 of 3
    assert rows[("intervened", "speech")]["control rate"] == pytest.approx(5 / 6)
    assert rows[("intervened", "text")]["control rate"] == pytest.approx(1 / 6)
    assert rows[("baseline", "speech")]["control rate"] == 0.0
    assert result.summary["cross-modal effect ratio"] == pytest.approx((1 / 6) / (5 / 6))
    assert rows[("intervened", "speech")]["identified as ja"] >= 0.5 and rows[("baseline", "text")][
        "identified as ja"] == 0.0
    assert rows[("baseline", "speech")]["bleu"] == 0.0 and rows[("intervened", "speech")]["chrf"] > 0


def test_a_weak_source_effect_gives_no_ratio_and_says_why(tmp_path):
    result = Generate(target="ja", tokens="whitespace", threshold=0.9).analyze(
        stub_view({"lm": 2}), dataset(), stores(tmp_path))
    assert result.summary["cross-modal effect ratio"] is None
    assert any("not above the threshold 0.9" in n for n in result.notes)


def test_bad_metric_options_are_refused_before_the_model_loads():
    with pytest.raises(UserError, match="No Latin/CJK script known for language 'ko'"):
        Generate(target="ko")
    with pytest.raises(UserError, match="no item has a 'gold' label"):
        Generate(reference="gold").check(dataset())
