"""Activation patching on the tiny Qwen2-Audio: who is patched from whom, a patch by oneself changes nothing, every
layer patched at every position gives the source's logits, a sweep's copies are each patched at one place only,
and the patching analysis reads them back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.cli import main
from lalm_probe.core.collect import collect
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Stores
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.lens.plugin import LogitLens
from lalm_probe.plugins.analyses.patching.measure import logit_difference, normalised_effect
from lalm_probe.plugins.analyses.patching.plugin import Patching
from lalm_probe.plugins.interventions.patch import Patch, label_pairs

TINY = ["--model", "qwen2audio", "--checkpoint", "tiny"]
# Equal lengths (one token per character), so every position of one can replace every position of the other.
TEXTS = {"a": ("hello there", "cat"), "b": ("jolly rogue", "dog"), "c": ("quiet night", "cat")}


def texts() -> Dataset:
    return Dataset([Stimulus(i, text=t, labels={"animal": a, "semantic_id": "s1"}) for i, (t, a) in TEXTS.items()])


def patched(session, spec, dataset, tmp_path) -> Dataset:
    """Calibrate and expand as the run pipeline does; returns the evaluated items."""
    calibration = spec.calibration(session.view, dataset, LogitLens())
    store = collect(session, calibration.items, calibration.requirements.reads(), ActivationStore(tmp_path, {}))
    spec.calibrate(session.view, calibration, store, LogitLens())
    return spec.expand(calibration.evaluate)


def logits(session, items, edits=()):
    h = session.run(items, ["lm.7.out"], ["all"], edits=edits)["lm.7.out@all"]
    return [session.view.lens(x, "lm", True, 7) for x in h]


def test_pairs_by_label_prefer_the_source_sharing_most_labels():
    items = [Stimulus(f"{s}-{lang}-{v}", text="x", labels={"semantic_id": s, "language": lang, "voice": v})
             for s in ("s1", "s2") for lang in ("en", "de", "fr") for v in ("m1", "f2")]
    pairs = label_pairs(Dataset(items), "semantic_id", ("language", "en"), None)
    assert pairs == {f"{s}-{lang}-{v}": f"{s}-en-{v}" for s in ("s1", "s2") for lang in ("de", "fr")
                     for v in ("m1", "f2")}
    assert set(label_pairs(Dataset(items), "semantic_id", ("language", "en"), ("language", "fr"))) == {
        f"{s}-fr-{v}" for s in ("s1", "s2") for v in ("m1", "f2")}
    spec = Patch(source_where="language:en", target_where="voice:f2")
    assert set(spec.resolve_pairs(Dataset(items))) == {f"{s}-{lang}-f2" for s in ("s1", "s2") for lang in ("de", "fr")}


def test_patch_refusals():
    data = texts()
    with pytest.raises(UserError, match="source item 'zz' is not in the data"):
        Patch(source="zz").check(data, LogitLens())
    with pytest.raises(UserError, match="source item 'q' is not in the data"):
        Patch(pairs={"a": "q"}).check(data, LogitLens())
    with pytest.raises(UserError, match="no item has animal 'cow' \\(values: cat, dog\\)"):
        Patch(source_where="animal:cow").check(data, LogitLens())
    with pytest.raises(UserError, match="must look like <label>:<value>"):
        Patch(source_where="animal").check(data, LogitLens())
    with pytest.raises(UserError, match="exactly one of source"):
        Patch()
    with pytest.raises(UserError, match="not a state to replace"):
        Patch(source="a", positions=["mean"])


def test_patching_an_item_with_itself_changes_nothing(qwen_session, tmp_path):
    data = Dataset([*texts(), Stimulus("s", audio=tone(200, 0.4), sample_rate=SR, prompt="Hi?")])
    spec = Patch(pairs={i: i for i in ("a", "s")}, sites=["lm.*.out", "lm.*.mlp_act"], positions=["all"])
    evaluated = patched(qwen_session, spec, data, tmp_path)
    assert [it.id for it in evaluated] == ["a", "b", "c", "s"]
    for before, after in zip(logits(qwen_session, evaluated.items), logits(qwen_session, evaluated.items,
                                                                            spec.edits(qwen_session.view))):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_every_layer_patched_at_every_position_gives_the_source_logits(qwen_session, tmp_path):
    spec = Patch(pairs={"b": "a", "c": "a"}, positions=["all"])  # default sites: every lm layer's block output
    patched(qwen_session, spec, texts(), tmp_path)
    edits = spec.edits(qwen_session.view)
    assert [e.site for e in edits] == [f"lm.{layer}.out" for layer in range(8)]
    clean = logits(qwen_session, texts().items)
    after = logits(qwen_session, texts().items, edits)
    torch.testing.assert_close(after[0], clean[0])  # not a target
    for target in (1, 2):
        assert not torch.allclose(clean[target], clean[0], atol=1e-3)
        torch.testing.assert_close(after[target], clean[0], atol=1e-5, rtol=1e-5)
    # a source span longer than the target's is refused in one sentence
    long = Patch(pairs={"t": "a"}, positions=["text"], sites=["lm.2.out"])
    short = Dataset([*texts(), Stimulus("t", text="hi")])
    patched(qwen_session, long, short, tmp_path / "long")
    with pytest.raises(UserError, match="a value of 11 positions is longer than the 2 positions of item 't'"):
        qwen_session.run(short.items, ["lm.3.out"], ["last"], edits=long.edits(qwen_session.view))


def test_a_sweep_patches_each_copy_at_its_own_site_only(qwen_session, tmp_path):
    spec = Patch(source_where="animal:dog", sites=["lm.2.out", "lm.5.out"], positions=["last", "token:-3"],
                 sweep=True)
    evaluated = patched(qwen_session, spec, texts(), tmp_path)
    copies = [it for it in evaluated if "patch_of" in it.labels]
    assert len(copies) == 2 * 2 * 2 and [it.id for it in evaluated][:3] == ["a", "b", "c"]
    one = next(it for it in copies if it.labels["patch_of"] == "a" and it.labels["patch_site"] == "lm.2.out"
               and it.labels["patch_position"] == "last")
    assert one.id == "a~lm.2.out@last" and one.text == "hello there"
    assert {k: one.labels[k] for k in ("patch_source", "patch_layer", "patch_component")} == {
        "patch_source": "b", "patch_layer": 2, "patch_component": "out"}
    edits = spec.edits(qwen_session.view)
    assert len(edits) == 4 and all(len(e.value) == 2 for e in edits)  # one per condition, one value per copy
    reads = qwen_session.run(evaluated.items, ["lm.1.out", "lm.2.out", "lm.4.out"], ["last", "token:-3"],
                             edits=edits)
    clean = qwen_session.run(texts().items, ["lm.1.out", "lm.2.out", "lm.4.out"], ["last", "token:-3"])
    row = {it.id: n for n, it in enumerate(evaluated)}
    i = row["a~lm.2.out@last"]
    torch.testing.assert_close(reads["lm.2.out@last"][i], clean["lm.2.out@last"][1])  # b's state
    torch.testing.assert_close(reads["lm.2.out@token:-3"][i], clean["lm.2.out@token:-3"][0])  # a's own
    torch.testing.assert_close(reads["lm.1.out@last"][i], clean["lm.1.out@last"][0])
    j = row["a~lm.5.out@last"]
    torch.testing.assert_close(reads["lm.4.out@last"][j], clean["lm.4.out@last"][0])  # patched later: unchanged here
    for n in range(3):  # the originals are not patched
        torch.testing.assert_close(reads["lm.4.out@last"][n], clean["lm.4.out@last"][n])


def test_normalised_effect_by_hand():
    lg = np.array([[1.0, 3.0, 0.0], [2.0, 0.0, 5.0]])
    assert logit_difference(lg, np.array([1, 2]), np.array([0, 0])).tolist() == [2.0, 3.0]
    out = normalised_effect(np.array([2.0, 1.0, 4.0]), np.array([0.0, 1.0, 0.0]), np.array([4.0, 1.0, 4.0]))
    assert out[0] == 0.5 and np.isnan(out[1]) and out[2] == 1.0


def test_the_patching_analysis_reads_the_sweep(qwen_session, tmp_path):
    spec = Patch(source_where="animal:dog", sites=["lm.*.out"], sweep=True)
    evaluated = patched(qwen_session, spec, texts(), tmp_path / "cal")
    analysis = Patching(label="animal")
    store = collect(qwen_session, evaluated, analysis.requirements(qwen_session.view, evaluated).reads(),
                    ActivationStore(tmp_path / "store", {}), edits=spec.edits(qwen_session.view))
    result = analysis.analyze(qwen_session.view, evaluated, Stores(intervened=store))
    rows = {r["layer"]: r for r in result.tables[0].rows}
    assert sorted(rows) == list(range(8)) and all(r["pairs"] == 2 for r in rows.values())  # a and c, from b
    assert rows[7]["effect"] == pytest.approx(1.0, abs=1e-4)  # the last layer's state is the output
    # by hand for one copy: the logit difference between 'd' (dog, the source's) and 'c' (cat, the target's)
    tok = qwen_session.plugin.tokenizer
    d, c = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("dog", "cat"))
    out = {it.id: lg[-1] for it, lg in zip(evaluated, logits(qwen_session, evaluated.items,
                                                                   spec.edits(qwen_session.view)))}
    ld = {k: float(v[d] - v[c]) for k, v in out.items()}
    by_hand = (ld["a~lm.3.out@last"] - ld["a"]) / (ld["b"] - ld["a"])
    copy = next(r for r in result.tables[1].rows if r["id"] == "a~lm.3.out@last")
    assert copy["effect"] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    assert result.arrays["effect/out"].shape == (8, 1) and "patching_effect" in result.figures
    with pytest.raises(UserError, match="patching reads the copies a patch sweep makes"):
        analysis.analyze(qwen_session.view, texts(), Stores(baseline=store))


def test_a_patch_sweep_run_round_trips_and_probe_analyze_rebuilds_it(capsys, tmp_path, gender_manifest):
    out, again = tmp_path / "run", tmp_path / "again"
    spec = "patch:source=item0,target_where=gender:female,sites=[lm.2.out;lm.6.out],sweep=true"
    args = [*TINY, "--analysis", "patching:label=gender", "--data", str(gender_manifest), "--no-baseline"]
    assert main(["run", *args, "--intervention", spec, "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["dataset"]["ids"] == [f"item{i}" for i in range(12)]  # the data; the copies are rebuilt
    first = np.load(out / "arrays.npz")
    assert first["effect/out"].shape == (2, 1) and len(first["item_ids"]) == 12 + 6 * 2
    (saved,) = record["interventions"]
    (tmp_path / "spec.json").write_text(json.dumps(saved))
    assert main(["run", *args, "--intervention", str(tmp_path / "spec.json"), "--out", str(again)]) == 0
    np.testing.assert_allclose(np.load(again / "arrays.npz")["copy_effect"], first["copy_effect"], atol=1e-6)
    # another analysis on the same run: the patch is rebuilt from run.json and its calibration store
    code = main(["analyze", str(out), "--analysis", "logitlens:label=gender,heatmap_items=0,positions=[last]"])
    assert code == 0, capsys.readouterr().err
    lens = np.load(out / "analyses/logitlens/arrays.npz")
    ids = list(lens["item_ids"])
    probs = lens["intervened/last/label_probs"][-1]
    # item1 patched at lm.6.out@last from item0 reads like item0 there, unlike item1 itself
    assert not np.allclose(probs[ids.index("item1~lm.6.out@last")], probs[ids.index("item1")])
