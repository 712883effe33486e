"""ActAdd, mean-difference and unembedding-difference steering on the tiny Qwen2-Audio: each vector against one
computed by hand, where it lands, when it is applied, and its spec through run.json and back."""

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
from lalm_probe.core.model import Prompt
from lalm_probe.core.registry import discover
from lalm_probe.core.run import build_spec
from lalm_probe.core.spec import build_params, spec_to_json, split_spec
from lalm_probe.core.store import ActivationStore
from lalm_probe.plugins.analyses.lens.plugin import LogitLens
from lalm_probe.plugins.interventions.actadd import ActAdd, front_aligned_difference, pad_with_spaces
from lalm_probe.plugins.interventions.steer import Steer, mean_difference
from lalm_probe.plugins.interventions.unembed_steer import UnembedSteer

TINY = ["--model", "qwen2audio", "--checkpoint", "tiny"]


def calibrated(session, spec, dataset, analysis, tmp_path):
    """Run an intervention's calibration stage as the pipeline does; returns the items it leaves to evaluate."""
    calibration = spec.calibration(session.view, dataset, analysis)
    if calibration is None:
        return dataset
    prompt = calibration.prompt or (lambda it: analysis.prompt(session.view, it))
    store = collect(session, calibration.items, calibration.requirements.reads(), ActivationStore(tmp_path, {}),
                    prompt_fn=prompt)
    spec.calibrate(session.view, calibration, store, analysis)
    return calibration.evaluate


def speech(n: int, prompt: str | None = "Describe the speaker.") -> list[Stimulus]:
    return [Stimulus(f"s{i}", audio=tone(140 + 30 * i, 0.3 + 0.05 * i), sample_rate=SR, prompt=prompt,
                     labels={"gender": "female" if i % 2 else "male", "tint": ["red", "blue", "green"][i % 3]})
            for i in range(n)]


# ---- ActAdd ------------------------------------------------------------------------------------------------
def test_padding_and_the_front_aligned_sum_of_pairs():
    def count(text: str) -> int:
        return len(text)  # one token per character, as the tiny tokenizer

    assert pad_with_spaces(("Good", "Bad"), count) == ("Good", "Bad ")
    assert pad_with_spaces(("Hi", "Hello"), count) == ("Hi   ", "Hello")
    with pytest.raises(UserError, match="merges spaces"):
        pad_with_spaces(("a", "abc"), lambda t: len(t.rstrip()) or 1)
    a, b, c = np.ones((3, 2)), np.full((1, 2), 2.0), np.full((2, 2), 5.0)
    np.testing.assert_array_equal(front_aligned_difference([a, c], [b, a]),
                                  [[1 - 2 + 5 - 1, 1 - 2 + 5 - 1], [1 + 5 - 1] * 2, [1 - 1] * 2])


def test_actadd_adds_the_per_position_difference_at_the_start_of_the_text(qwen_session, tmp_path):
    spec = ActAdd(add=["Good"], sub=["Bad"], layer=3, coeff=2.0)
    items = speech(2) + [Stimulus("t", text="a sentence to steer", prompt="Go on.")]
    calibrated(qwen_session, spec, Dataset(items), LogitLens(), tmp_path)
    # by hand: the prompts alone (no instruction), "Bad" padded with one space to the 4 tokens of "Good"
    bare = qwen_session.run([Stimulus("g", text="Good"), Stimulus("b", text="Bad ")], ["lm.3.out"], ["all:text"],
                            prompt_fn=lambda it: Prompt())["lm.3.out@all:text"]
    diff = (bare[0] - bare[1]).numpy()
    np.testing.assert_allclose(np.asarray(spec.diff), diff, atol=1e-6)
    (edit,) = spec.edits(qwen_session.view)
    assert (edit.site, edit.op, edit.positions, edit.scale, edit.steps) == ("lm.3.out", "add", "text", 2.0, [1])
    clean = qwen_session.run(items, ["lm.3.out"], ["all"])["lm.3.out@all"]
    steered = qwen_session.run(items, ["lm.3.out"], ["all"], edits=[edit])["lm.3.out@all"]
    for row, before, after in zip(qwen_session.prepare(items).rows, clean, steered):
        start = row["lm"].spans["text"][0]
        added = (after - before).numpy()
        np.testing.assert_allclose(added[start:start + 4], 2.0 * diff, atol=1e-5)
        assert np.abs(np.delete(added, range(start, start + 4), axis=0)).max() == 0  # nowhere else


def test_actadd_without_padding_zero_pads_the_difference(qwen_session, tmp_path):
    spec = ActAdd(add=["Good"], sub=["Bad"], layer=1, pad="none")
    calibrated(qwen_session, spec, Dataset(speech(1)), LogitLens(), tmp_path)
    bare = qwen_session.run([Stimulus("g", text="Good"), Stimulus("b", text="Bad")], ["lm.1.out"], ["all:text"],
                            prompt_fn=lambda it: Prompt())["lm.1.out@all:text"]
    expected = bare[0].clone()
    expected[:3] -= bare[1]
    np.testing.assert_allclose(np.asarray(spec.diff), expected.numpy(), atol=1e-6)


def test_actadd_steers_the_prompt_pass_only(qwen_session, tmp_path):
    spec = ActAdd(add=["Love"], sub=["Hate"], layer=2, coeff=4.0, at="audio")
    items = speech(1)
    calibrated(qwen_session, spec, Dataset(items), LogitLens(), tmp_path)
    edits = spec.edits(qwen_session.view)
    gen = qwen_session.generate(items, 2, ["lm.2.out"], ["step:2"], edits=edits)
    # the generated position equals a forward pass over prompt + that token with the difference on the prompt only
    prepared = qwen_session.prepare(items)
    prompt_len = prepared.inputs["input_ids"].shape[1]
    forced = qwen_session.plugin.teacher_forced(prepared, gen.prepared, gen.sequences[:, prompt_len:prompt_len + 1])
    again = qwen_session.trace(forced, ["s0"], qwen_session.reads(["lm.2.out"], ["last"]), edits)
    torch.testing.assert_close(gen.reads["lm.2.out@step:2"], again["lm.2.out@last"], atol=1e-5, rtol=1e-4)


def test_actadd_refusals(qwen_session):
    with pytest.raises(UserError, match="a steering prompt is empty"):
        build_params(ActAdd, split_spec("actadd:add=,sub=Bad")[1], "actadd")
    with pytest.raises(UserError, match="in pairs"):
        ActAdd(add=["a", "b"], sub=["c"])
    with pytest.raises(UserError, match="layer 99 is out of range"):
        ActAdd(add=["a"], sub=["b"], layer=99).calibration(qwen_session.view, Dataset(speech(1)), LogitLens())
    wide = ActAdd(add=["a"], sub=["b"], diff=[[0.0] * 3])
    with pytest.raises(UserError, match="has 3 units but 'lm.4.out' has 64"):
        wide.edits(qwen_session.view)
    long = ActAdd(add=["a"], sub=["b"], layer=4, diff=np.zeros((40, 64)).tolist())
    with pytest.raises(UserError, match="a value of 40 positions is longer than the 4 positions of item 't' at 'text'"):
        qwen_session.run([Stimulus("t", text="tiny")], ["lm.4.out"], ["last"], edits=long.edits(qwen_session.view))


# ---- mean difference ---------------------------------------------------------------------------------------
def test_steer_vector_is_the_class_mean_difference(qwen_session, tmp_path):
    items = Dataset(speech(12))
    by_hand = qwen_session.run(items.items, ["lm.3.out"], ["mean"])["lm.3.out@mean"].numpy()
    gender = np.array([it.labels["gender"] for it in items])
    for baseline in ("male", None):
        spec = Steer(label="gender", target="female", baseline=baseline, site="lm.3.out", read="mean", probe_size=6)
        rest = calibrated(qwen_session, spec, items, LogitLens(), tmp_path / str(baseline))
        used = np.isin([it.id for it in items], spec.calibration_items)
        assert used.sum() == 6 and sorted(gender[used]) == ["female"] * 3 + ["male"] * 3  # stratified
        assert [it.id for it in rest] == [it.id for it in items if it.id not in spec.calibration_items]
        expected = by_hand[used & (gender == "female")].mean(0) - by_hand[used & (gender == "male")].mean(0)
        np.testing.assert_allclose(spec.vector, expected, atol=1e-6)
        assert spec.norm == pytest.approx(np.linalg.norm(expected), rel=1e-5)
    tint = np.array([it.labels["tint"] for it in items])
    spec = Steer(label="tint", target="red", site="lm.3.out", read="mean", split="all")  # minus every other item
    calibrated(qwen_session, spec, items, LogitLens(), tmp_path / "all")
    np.testing.assert_allclose(spec.vector, by_hand[tint == "red"].mean(0) - by_hand[tint != "red"].mean(0),
                               atol=1e-6)
    assert mean_difference(np.eye(3), ["a", "b", "b"], "a", None).tolist() == [1.0, -0.5, -0.5]


def test_steer_adds_its_vector_where_and_when_asked(qwen_session):
    vector = np.linspace(-1, 1, 64).astype(np.float32)
    items = speech(2)
    clean = qwen_session.generate(items, 2, ["lm.5.out"], ["step:1"])
    runs = {}
    for steps in (None, [1]):
        (edit,) = Steer(vector=vector.tolist(), site="lm.5.out", scale=2.0, steps=steps).edits(qwen_session.view)
        runs[str(steps)] = gen = qwen_session.generate(items, 2, ["lm.5.out"], ["step:1", "step:2"], edits=[edit])
        added = clean.reads["lm.5.out@step:1"] + 2 * torch.tensor(vector)
        torch.testing.assert_close(gen.reads["lm.5.out@step:1"], added)
    # step 2 reads the first generated token (the same in both runs): added to it only when every step is steered
    torch.testing.assert_close(runs["None"].reads["lm.5.out@step:2"],
                               runs["[1]"].reads["lm.5.out@step:2"] + 2 * torch.tensor(vector), atol=1e-5, rtol=1e-5)
    (edit,) = Steer(vector=vector.tolist(), site="lm.5.out", positions="audio").edits(qwen_session.view)
    assert edit.positions == "audio" and edit.steps is None


def test_the_random_control_keeps_the_norm(qwen_session, tmp_path):
    items = Dataset(speech(8))
    real = Steer(label="gender", target="female", site="lm.2.out", split="all")
    calibrated(qwen_session, real, items, LogitLens(), tmp_path / "a")
    control = Steer(label="gender", target="female", site="lm.2.out", split="all", control="random", seed=3)
    calibrated(qwen_session, control, items, LogitLens(), tmp_path / "b")
    assert np.linalg.norm(control.vector) == pytest.approx(np.linalg.norm(real.vector), rel=1e-5)
    assert control.norm == pytest.approx(real.norm)
    assert abs(np.dot(control.vector, real.vector)) < 0.5 * real.norm ** 2


def test_steer_refusals(qwen_session):
    data = Dataset(speech(4))
    with pytest.raises(UserError, match="no item has gender 'robot' \\(values: female, male\\)"):
        Steer(label="gender", target="robot").check(data, LogitLens())
    with pytest.raises(UserError, match="has no label 'accent'"):
        Steer(label="accent", target="x").check(data, LogitLens())
    with pytest.raises(UserError, match="the vector has 3 units but site 'lm.3.out' has 64"):
        Steer(vector=[1.0, 2.0, 3.0], site="lm.3.out").edits(qwen_session.view)
    with pytest.raises(UserError, match="needs label=<key> and target=<value>"):
        Steer(label="gender")
    with pytest.raises(UserError, match="probe_size=20 must be between 1 and 3"):
        Steer(label="gender", target="female").calibration(qwen_session.view, data, LogitLens())


def test_a_vector_from_an_earlier_run_equals_the_mean_over_its_store(capsys, tmp_path, gender_manifest,
                                                                    qwen_session):
    earlier = tmp_path / "earlier"
    assert main(["run", *TINY, "--analysis", "logitlens:label=gender,heatmap_items=0", "--data",
                 str(gender_manifest), "--out", str(earlier)]) == 0
    record = json.loads((earlier / "run.json").read_text())
    store = ActivationStore.open(earlier / record["stores"]["baseline"])
    ids = [f"item{i}" for i in range(12)]
    states = store.array("lm.4.out@last", ids)[:]
    female = np.array([i % 2 == 1 for i in range(12)])
    spec = Steer(label="gender", target="female", site="lm.4.out", from_run=str(earlier))
    data = Dataset(speech(3))
    rest = calibrated(qwen_session, spec, data, LogitLens(), tmp_path / "cal")
    assert [it.id for it in rest] == ["s0", "s1", "s2"] and spec.calibration_items is None  # every item evaluated
    np.testing.assert_allclose(spec.vector, states[female].mean(0) - states[~female].mean(0), atol=1e-6)
    with pytest.raises(UserError, match="holds no 'lm.4.out@mean'"):
        calibrated(qwen_session, Steer(label="gender", target="female", site="lm.4.out", read="mean",
                                       from_run=str(earlier)), data, LogitLens(), tmp_path / "x")
    with pytest.raises(UserError, match="is not a run folder"):
        Steer(label="gender", target="female", from_run=str(tmp_path)).check(data, LogitLens())


# ---- unembedding difference --------------------------------------------------------------------------------
def test_the_unembedding_difference_is_the_rows_of_w_u(qwen_session, tmp_path):
    tok, weight = qwen_session.plugin.tokenizer, qwen_session.plugin.model.lm_head.weight.detach().numpy()
    spec = UnembedSteer(new="cat", old="dog", strength=3.0, layer=2)
    first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("dog", "cat")]
    np.testing.assert_array_equal(spec.vector(qwen_session.view, "dog", "cat"), weight[first[1]] - weight[first[0]])
    items = speech(2)
    (edit,) = spec.edits(qwen_session.view)
    assert (edit.site, edit.positions, edit.scale, edit.steps) == ("lm.2.out", "audio", 3.0, [1])
    clean = qwen_session.run(items, ["lm.2.out"], ["all"])["lm.2.out@all"]
    steered = qwen_session.run(items, ["lm.2.out"], ["all"], edits=[edit])["lm.2.out@all"]
    for row, before, after in zip(qwen_session.prepare(items).rows, clean, steered):
        s, e = row["lm"].spans["audio"]
        added = (after - before).numpy()
        np.testing.assert_allclose(added[s:e], np.tile(3.0 * (weight[first[1]] - weight[first[0]]), (e - s, 1)),
                                   atol=1e-5)
        assert np.abs(np.delete(added, range(s, e), axis=0)).max() == 0
    # per item: each item's own label word is steered away from
    labelled = UnembedSteer(new="frog", old="label:tint", layer=2)
    calibrated(qwen_session, labelled, Dataset(items), LogitLens(), tmp_path)
    assert labelled.words == {"s0": ["red", "frog"], "s1": ["blue", "frog"]}
    (edit,) = labelled.edits(qwen_session.view)
    np.testing.assert_array_equal(edit.value["s1"], labelled.vector(qwen_session.view, "blue", "frog"))


def test_unembed_steer_refusals(qwen_session):
    with pytest.raises(UserError, match="needs new=<token string> and old=<token string>"):
        UnembedSteer(new="cat")
    with pytest.raises(UserError, match="has no label 'species'"):
        UnembedSteer(new="cat", old="label:species").check(Dataset(speech(1)), LogitLens())
    with pytest.raises(UserError, match="layer 8 is out of range"):
        UnembedSteer(new="cat", old="dog", layer=8).edits(qwen_session.view)


# ---- through run.json and back ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "actadd:add=[Good;Fine],sub=[Bad;Awful],layer=3,coeff=3",
    "steer:label=gender,target=female,site=lm.4.out,probe_size=4,scale=4",
    "unembed-steer:new=cat,old=dog,layer=2,strength=20",
])
def test_a_spec_round_trips_through_run_json_and_reruns_to_the_same_result(spec, capsys, tmp_path,
                                                                           gender_manifest):
    first, again = tmp_path / "first", tmp_path / "again"
    analysis = "logitlens:attribute=gender,prompt_format=qa,heatmap_items=0"
    args = [*TINY, "--analysis", analysis, "--data", str(gender_manifest)]
    assert main(["run", *args, "--intervention", spec, "--out", str(first)]) == 0, capsys.readouterr().err
    record = json.loads((first / "run.json").read_text())
    (saved,) = record["interventions"]
    assert saved["name"] == split_spec(spec)[0]
    assert spec_to_json(build_spec(discover(), "intervention", saved)) == saved  # resolved values included
    file = tmp_path / "spec.json"
    file.write_text(json.dumps(saved))
    assert main(["run", *args, "--intervention", str(file), "--out", str(again)]) == 0, capsys.readouterr().err
    rerun = json.loads((again / "run.json").read_text())
    assert rerun["interventions"] == [saved] and rerun["dataset"]["ids"] == record["dataset"]["ids"]
    a, b = np.load(first / "arrays.npz"), np.load(again / "arrays.npz")
    np.testing.assert_allclose(a["intervened/last/label_probs"], b["intervened/last/label_probs"], atol=1e-6)
    assert not np.allclose(a["intervened/last/label_probs"], a["baseline/last/label_probs"])  # it did steer


def test_resolved_values_survive_json_exactly():
    vector = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    spec = Steer(label="gender", target="female", vector=vector.tolist(), norm=1.4, calibration_items=["a"])
    again = build_params(Steer, json.loads(json.dumps(spec_to_json(spec)))["params"], "steer")
    assert again == spec and np.array_equal(np.asarray(again.vector, np.float32), vector)  # float32 bit for bit


# ---- with other analyses -----------------------------------------------------------------------------------
@pytest.fixture
def parallel_texts(tmp_path):
    """Four sentences in English and German as text items, paired by semantic_id."""
    words = {"s1": ("good morning", "guten morgen"), "s2": ("thank you", "danke schoen"),
             "s3": ("the red house", "das rote haus"), "s4": ("one two three", "eins zwei drei")}
    lines = [json.dumps({"id": f"{sid}-{lang}", "text": text, "labels": {"language": lang, "semantic_id": sid}})
             for sid, pair in words.items() for lang, text in zip(("en", "de"), pair)]
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("analysis, interventions", [
    ("hub:compare=[language],corpus=dataset",
     ["steer:label=language,target=de,baseline=en,site=lm.3.out,split=all,scale=3"]),
    ("generate:max_new_tokens=3", ["actadd:add=Good,sub=Bad,layer=2",
                                   "unembed-steer:new=x,old=y,layer=4,positions=text,strength=50"]),
    ("generate:max_new_tokens=3", ['patch:pairs={"s4-en":"s3-en"},positions=[all]']),
    ("neurons:components=[mlp_up],stacks=[lm],steps=[],k=2", ["actadd:add=Good,sub=Bad,layer=1,coeff=20"]),
])
def test_the_interventions_compose_with_other_analyses(analysis, interventions, capsys, tmp_path, parallel_texts):
    out = tmp_path / "run"
    argv = ["run", *TINY, "--analysis", analysis, "--data", str(parallel_texts), "--out", str(out)]
    for spec in interventions:
        argv += ["--intervention", spec]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert [iv["name"] for iv in record["interventions"]] == [s.split(":")[0] for s in interventions]
    summary = json.loads((out / "results.json").read_text())["summary"]
    if analysis.startswith("generate"):
        assert (out / "baseline_outputs.jsonl").is_file() and "outputs changed by the intervention" in summary
        if "patch" not in interventions[0]:  # a patched prompt may well be continued as before on a tiny model
            assert summary["outputs changed by the intervention"] >= 1
    elif analysis.startswith("neurons"):  # the steered run's AP table is its own (layer 1 on: steered states)
        table = "expertise/language=de/text/last.csv"
        assert (out / table).read_text() != (out / "intervened" / table).read_text()
    else:
        arrays = np.load(out / "arrays.npz")
        steered = [k for k in arrays.files if k.startswith("intervened")]
        assert steered and not all(np.allclose(arrays[k], arrays[k.replace("intervened", "baseline", 1)])
                                   for k in steered if k.replace("intervened", "baseline", 1) in arrays.files)


def test_an_actadd_sweep_calibrates_once_and_scale_zero_is_the_baseline(capsys, tmp_path, parallel_texts):
    out = tmp_path / "sweep"
    assert main(["run", *TINY, "--analysis", "logitlens:label=language", "--data", str(parallel_texts), "--out",
                 str(out), "--intervention", "actadd:add=Good,sub=Bad,layer=1,coeff=[0,30]"]) == 0, \
        capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    variants = record["sweep"]["variants"]
    assert [v["params"]["coeff"] for v in variants] == [0, 30]
    diffs = [np.asarray(v["interventions"][0]["params"]["diff"]) for v in variants]
    assert np.array_equal(diffs[0], diffs[1]) and np.abs(diffs[0]).max() > 0  # one calibration, both variants
    assert len(list((out / "store").glob("calibration-*"))) == 1
    results = json.loads((out / "results.json").read_text())
    per = {r["coeff"]: r["accuracy"] for r in next(t for t in results["tables"]
                                                    if t["title"] == "accuracy per variant")["rows"]}
    assert per[0] == pytest.approx(results["summary"]["accuracy (baseline @last)"])
