"""Engine behaviour on the tiny Qwen2-Audio: lens math, resumable collection, edits and decode steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit
from lalm_probe.core.store import ActivationStore

from helpers import SR, tone


def dataset(n: int = 10) -> Dataset:
    return Dataset([Stimulus(f"x{i}", audio=tone(150 + 40 * i, 0.3 + 0.07 * i), sample_rate=SR, prompt="Hi?")
                    for i in range(n)])


def test_lens_equals_unembed_of_norm_by_hand(qwen_session):
    model = qwen_session.plugin.model
    out = qwen_session.run(dataset(2).items, ["lm.3.out"], ["last"])
    h = out["lm.3.out@last"]
    by_hand = model.lm_head(model.model.language_model.norm(h))
    torch.testing.assert_close(qwen_session.lens(h, norm=True), by_hand)
    torch.testing.assert_close(qwen_session.lens(h, norm=False), model.lm_head(h))
    assert not torch.allclose(by_hand, model.lm_head(h))  # the two modes really differ


def test_lens_of_last_layer_equals_model_logits(qwen_session):
    items = dataset(3).items
    prepared = qwen_session.prepare(items)
    with torch.no_grad():
        logits = qwen_session.plugin.model(**prepared.inputs).logits[:, -1]
    last = qwen_session.plugin.resolved["lm"].num_layers - 1
    h = qwen_session.run(items, [f"lm.{last}.out"], ["last"])[f"lm.{last}.out@last"]
    torch.testing.assert_close(qwen_session.lens(h), logits, atol=1e-5, rtol=1e-4)


def _collect(session, ds, root, **kw):
    store = ActivationStore(root, {"test": ds.fingerprint()})
    return session.collect(ds, ["lm.*.out"], ["last", "mean"], store, batch_size=3, shard_rows=3, **kw)


def test_resume_after_interruption_equals_uninterrupted(qwen_session, tmp_path, monkeypatch):
    ds = dataset()
    full_ids, full = _collect(qwen_session, ds, tmp_path / "full").load(order=[it.id for it in ds])

    calls = {"n": 0}
    real_run = qwen_session.tracer.run

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(qwen_session.tracer, "run", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _collect(qwen_session, ds, tmp_path / "resumed")
    partial = ActivationStore.open(tmp_path / "resumed")
    assert not partial.complete and len(partial.stored_ids()) == 6  # two finished shards survive
    monkeypatch.setattr(qwen_session.tracer, "run", real_run)
    resumed = _collect(qwen_session, ds, tmp_path / "resumed")
    ids, arrays = resumed.load(order=[it.id for it in ds])
    assert resumed.complete and ids == full_ids
    raw_ids = [i for s in resumed.manifest["shards"] for i in s["ids"]]
    assert len(raw_ids) == len(set(raw_ids)) == len(ds)  # nothing lost, nothing duplicated
    for key in full:
        np.testing.assert_array_equal(arrays[key], full[key])


def test_store_refuses_a_different_configuration(tmp_path):
    ActivationStore(tmp_path, {"model": "a"})
    with pytest.raises(UserError, match="different configuration"):
        ActivationStore(tmp_path, {"model": "b"})


def test_add_edit_changes_target_and_later_layers_only(qwen_session):
    items = dataset(2).items
    clean = qwen_session.run(items, ["lm.*.out"], ["last", "mean"])
    vec = torch.ones(qwen_session.plugin.model.config.text_config.hidden_size)
    edited = qwen_session.run(items, ["lm.*.out"], ["last", "mean"],
                              edits=[Edit(site="lm.4.out", op="add", positions="last", value=vec, scale=2.0)])
    for layer in range(4):
        torch.testing.assert_close(edited[f"lm.{layer}.out@last"], clean[f"lm.{layer}.out@last"])
    torch.testing.assert_close(edited["lm.4.out@last"], clean["lm.4.out@last"] + 2.0)
    assert not torch.allclose(edited["lm.5.out@last"], clean["lm.5.out@last"])


def test_source_edit_adds_the_clean_state_of_the_source_layer(qwen_session):
    items = dataset(2).items
    clean = qwen_session.run(items, ["lm.*.out"], ["last"])
    edited = qwen_session.run(items, ["lm.6.out"], ["last"],
                              edits=[Edit(site="lm.6.out", op="add", source="lm.1.out@last", scale=0.5)])
    torch.testing.assert_close(edited["lm.6.out@last"], clean["lm.6.out@last"] + 0.5 * clean["lm.1.out@last"])


def test_set_edit_overwrites_chosen_units_at_every_position(qwen_session):
    items = dataset(2).items
    edited = qwen_session.run(items, ["lm.2.mlp"], ["all"],
                              edits=[Edit(site="lm.2.mlp", op="set", positions="mean", units=[0, 5], value=[3.0, -1.0])])
    for row in edited["lm.2.mlp@all"]:
        assert torch.all(row[:, 0] == 3.0) and torch.all(row[:, 5] == -1.0)


def test_block_attention_changes_only_the_masked_query(qwen_session):
    items = dataset(2).items
    clean = qwen_session.run(items, ["lm.*.out"], ["all"])
    masked = qwen_session.run(items, ["lm.*.out"], ["all"], edits=[
        Edit(site=f"lm.{layer}.attn", op="block_attention", positions="last", keys="audio") for layer in range(8)])
    for layer in range(8):
        for c, m in zip(clean[f"lm.{layer}.out@all"], masked[f"lm.{layer}.out@all"]):
            torch.testing.assert_close(m[:-1], c[:-1])  # every other position attends as before
            assert not torch.allclose(m[-1], c[-1])


def test_step_scoped_edit_leaves_earlier_steps_unchanged(qwen_session):
    items = dataset(2).items
    n = 4
    clean, clean_ids = qwen_session.generate(items, n, ["lm.7.out"], ["last"])
    vec = 50 * torch.ones(qwen_session.plugin.model.config.text_config.hidden_size)
    edited, edited_ids = qwen_session.generate(items, n, ["lm.7.out"], ["last"], edits=[
        Edit(site="lm.7.out", op="add", positions="last", value=vec, steps=[2])])
    key = "lm.7.out@last"
    assert len(clean[key]) == len(edited[key]) == n
    for step in range(2):
        torch.testing.assert_close(edited[key][step], clean[key][step])
    torch.testing.assert_close(edited[key][2], clean[key][2] + 50)
    assert clean_ids.shape == edited_ids.shape
    prompt_len = qwen_session.prepare(items).inputs["input_ids"].shape[1]
    torch.testing.assert_close(edited_ids[:, : prompt_len + 2], clean_ids[:, : prompt_len + 2])


def test_per_step_reads_match_forced_prefix_forward_passes(qwen_session):
    items = dataset(1).items
    n = 3
    reads, ids = qwen_session.generate(items, n, ["lm.5.out"], ["last"])
    prepared = qwen_session.prepare(items)
    prompt_len = prepared.inputs["input_ids"].shape[1]
    for step in range(n):
        prefix = ids[:, : prompt_len + step]
        inputs = dict(prepared.inputs, input_ids=prefix, attention_mask=torch.ones_like(prefix),
                      position_ids=torch.arange(prefix.shape[1])[None])
        with torch.no_grad():
            hs = qwen_session.plugin.model(**inputs, output_hidden_states=True).hidden_states
        torch.testing.assert_close(reads["lm.5.out@last"][step], hs[6][:, -1], atol=1e-5, rtol=1e-4)
