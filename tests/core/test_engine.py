"""Engine behaviour on the tiny Qwen2-Audio: lens math, edits and decode steps."""

from __future__ import annotations

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.plugin import Edit


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
    positions = [f"step:{t}" for t in range(1, n + 1)]
    clean = qwen_session.generate(items, n, ["lm.7.out"], positions)
    vec = 50 * torch.ones(qwen_session.plugin.model.config.text_config.hidden_size)
    edited = qwen_session.generate(items, n, ["lm.7.out"], positions, edits=[
        Edit(site="lm.7.out", op="add", positions="last", value=vec, steps=[3])])
    for t in (1, 2):
        torch.testing.assert_close(edited.reads[f"lm.7.out@step:{t}"], clean.reads[f"lm.7.out@step:{t}"])
    torch.testing.assert_close(edited.reads["lm.7.out@step:3"], clean.reads["lm.7.out@step:3"] + 50)
    prompt_len = qwen_session.prepare(items).inputs["input_ids"].shape[1]
    torch.testing.assert_close(edited.sequences[:, : prompt_len + 2], clean.sequences[:, : prompt_len + 2])


def _forced_forward(session, items, prefix):
    """Hidden states of a plain forward pass over prompt + ``prefix`` (left-padded prompt, as generate sees it)."""
    prepared = session.prepare(items)
    ids = torch.cat([prepared.inputs["input_ids"], prefix], 1)
    mask = torch.cat([prepared.inputs["attention_mask"], torch.ones_like(prefix)], 1)
    inputs = dict(prepared.inputs, input_ids=ids, attention_mask=mask,
                  position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return session.plugin.model(**inputs, output_hidden_states=True).hidden_states, mask


def test_per_step_reads_match_forced_prefix_forward_passes(qwen_session):
    items = dataset(2).items
    n = 3
    gen = qwen_session.generate(items, n, ["lm.5.out"], [f"step:{t}" for t in range(1, n + 1)] + ["prefix:3"])
    prompt_len = qwen_session.prepare(items).inputs["input_ids"].shape[1]
    new = gen.sequences[:, prompt_len:]
    for t in range(1, n + 1):  # a hand-written loop: one forward pass per prefix
        hs, _ = _forced_forward(qwen_session, items, new[:, : t - 1])
        torch.testing.assert_close(gen.reads[f"lm.5.out@step:{t}"], hs[6][:, -1], atol=1e-5, rtol=1e-4)
    hs, mask = _forced_forward(qwen_session, items, new[:, :2])
    pooled = (hs[6] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(gen.reads["lm.5.out@prefix:3"], pooled, atol=1e-5, rtol=1e-4)


def test_forced_target_reads_match_teacher_forcing(qwen_session):
    items = [Stimulus(id=f"f{i}", audio=tone(200 + 40 * i, 0.6), sample_rate=SR, labels={"target": "abcdef"})
             for i in range(2)]
    gen = qwen_session.generate(items, 4, ["lm.3.out"], ["step:4"], force_target="target")
    target = torch.tensor([qwen_session.plugin.target_ids("abcdef")] * 2)
    prompt_len = qwen_session.prepare(items).inputs["input_ids"].shape[1]
    assert torch.equal(gen.sequences[:, prompt_len:prompt_len + 4], target[:, :4])
    hs, _ = _forced_forward(qwen_session, items, target[:, :3])
    torch.testing.assert_close(gen.reads["lm.3.out@step:4"], hs[4][:, -1], atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="forced prefix"):
        qwen_session.generate(items, 8, ["lm.3.out"], ["step:8"], force_target="target")


def test_edit_at_all_positions_follows_generation(qwen_session):
    items = dataset(1).items
    vec = torch.ones(qwen_session.plugin.model.config.text_config.hidden_size)
    clean = qwen_session.generate(items, 3, ["lm.2.out"], ["step:1", "step:3"])
    edited = qwen_session.generate(items, 3, ["lm.2.out"], ["step:1", "step:3"], edits=[
        Edit(site="lm.2.out", op="add", positions="all", value=vec)])
    # Edited outputs are read after the edit, at the prompt pass and at a generated position alike.
    torch.testing.assert_close(edited.reads["lm.2.out@step:1"], clean.reads["lm.2.out@step:1"] + 1)
    assert not torch.allclose(edited.reads["lm.2.out@step:3"], clean.reads["lm.2.out@step:3"])


def test_step_positions_need_a_per_step_stack(qwen_session):
    with pytest.raises(UserError, match="run once per input"):
        qwen_session.generate(dataset(1).items, 2, ["audio_encoder.0.out"], ["step:1"])
    with pytest.raises(UserError, match="numbered from 1"):
        qwen_session.generate(dataset(1).items, 2, ["lm.0.out"], ["step:0"])


def test_an_edit_limited_to_some_items_leaves_the_others_alone(qwen_session):
    items = dataset(3).items
    clean = qwen_session.run(items, ["lm.5.out"], ["last"])["lm.5.out@last"]
    vec = torch.ones(qwen_session.width("lm.3.out"))
    edited = qwen_session.run(items, ["lm.5.out"], ["last"], edits=[
        Edit(site="lm.3.out", op="add", positions="last", value=vec, items=["x1"])])["lm.5.out@last"]
    torch.testing.assert_close(edited[[0, 2]], clean[[0, 2]])
    assert not torch.allclose(edited[1], clean[1])


def test_all_positions_of_a_span_are_the_spans_rows_of_all(qwen_session):
    """``all:text``: every position of the text span (seed 004 averages the lens over the text's tokens)."""
    items = [Stimulus("t1", text="the cat"), Stimulus("t2", text="a much longer sentence here")]
    out = qwen_session.run(items, ["lm.2.out"], ["all", "all:text"])
    prepared = qwen_session.prepare(items)
    for b, row in enumerate(prepared.rows):
        s, e = row["lm"].spans["text"]
        torch.testing.assert_close(out["lm.2.out@all:text"][b], out["lm.2.out@all"][b][s:e])
    with pytest.raises(UserError, match="expected .all:<span>."):
        qwen_session.run(items, ["lm.2.out"], ["all:te xt"])
