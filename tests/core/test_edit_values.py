"""Edit values beyond one vector (tiny Qwen2-Audio): per-position matrices front-aligned on a span, one value per
item, whole-state replacement, reads of every position of a span, and the unembedding rows of the model view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from lalm_probe.core.plugin import Edit

# A batch that mixes a speech item (audio span, then its instruction) with text items of different lengths.
ITEMS = [Stimulus("speech", audio=tone(220, 0.4), sample_rate=SR, prompt="Which language?"),
         Stimulus("short", text="hello there"), Stimulus("long", text="a much longer sentence to read")]


def spans(session, items=ITEMS):
    return [r["lm"] for r in session.prepare(items).rows]


def test_every_position_of_a_span_is_read_one_by_one(qwen_session):
    out = qwen_session.run(ITEMS, ["lm.2.out"], ["all", "all:text", "text"])
    for whole, text, mean, row in zip(out["lm.2.out@all"], out["lm.2.out@all:text"], out["lm.2.out@text"],
                                      spans(qwen_session)):
        s, e = row.spans["text"]
        torch.testing.assert_close(text, whole[s:e])
        torch.testing.assert_close(text.mean(0), mean)
    audio = qwen_session.run(ITEMS[:1], ["lm.0.out"], ["all:audio"])["lm.0.out@all:audio"][0]
    assert len(audio) == np.subtract(*spans(qwen_session, ITEMS[:1])[0].spans["audio"][::-1])
    with pytest.raises(UserError, match="expected 'all:<span>'"):
        qwen_session.run(ITEMS, ["lm.2.out"], ["all:te-xt"])


def test_a_matrix_is_added_front_aligned_from_the_start_of_the_span(qwen_session):
    width = qwen_session.width("lm.3.out")
    matrix = np.random.default_rng(0).standard_normal((3, width)).astype(np.float32)
    clean = qwen_session.run(ITEMS, ["lm.3.out"], ["all"])["lm.3.out@all"]
    for where in ("text", "audio", "all"):
        items = ITEMS[:1] if where == "audio" else ITEMS
        edited = qwen_session.run(items, ["lm.3.out"], ["all"], edits=[
            Edit("lm.3.out", "add", positions=where, value=matrix, scale=2.0)])["lm.3.out@all"]
        for row, before, after in zip(spans(qwen_session, items), clean, edited):
            start = 0 if where == "all" else row.spans[where][0]
            expected = before.clone()
            expected[start:start + 3] += 2.0 * torch.from_numpy(matrix)
            torch.testing.assert_close(after, expected)  # exactly those three positions, nothing else


def test_a_matrix_longer_than_the_span_is_refused(qwen_session):
    width = qwen_session.width("lm.3.out")
    with pytest.raises(UserError, match="a value of 40 positions is longer than the 11 positions of item 'short' at "
                                        "'text'"):
        qwen_session.run(ITEMS[1:2], ["lm.3.out"], ["last"], edits=[
            Edit("lm.3.out", "add", positions="text", value=np.zeros((40, width), np.float32))])


def test_a_matrix_is_applied_at_the_prompt_pass_only(qwen_session):
    width = qwen_session.width("lm.2.out")
    matrix = np.ones((2, width), np.float32)
    every = qwen_session.generate(ITEMS[1:2], 3, ["lm.2.out"], ["step:1", "step:2", "step:3"], edits=[
        Edit("lm.2.out", "add", positions="all", value=matrix)])
    first = qwen_session.generate(ITEMS[1:2], 3, ["lm.2.out"], ["step:1", "step:2", "step:3"], edits=[
        Edit("lm.2.out", "add", positions="all", value=matrix, steps=[1])])
    clean = qwen_session.generate(ITEMS[1:2], 3, ["lm.2.out"], ["step:1"])
    for key in ("lm.2.out@step:2", "lm.2.out@step:3"):  # a generated position is never given a prompt position's row
        torch.testing.assert_close(every.reads[key], first.reads[key])
    torch.testing.assert_close(every.reads["lm.2.out@step:1"], clean.reads["lm.2.out@step:1"])  # last is past row 2


def test_one_value_per_item_and_items_without_one_are_left_alone(qwen_session):
    width = qwen_session.width("lm.4.out")
    value = {"short": np.full(width, 1.0, np.float32), "long": np.full(width, -2.0, np.float32)}
    base = qwen_session.run(ITEMS, ["lm.4.out"], ["text"])["lm.4.out@text"]
    edited = qwen_session.run(ITEMS, ["lm.4.out"], ["text"], edits=[
        Edit("lm.4.out", "add", positions="text", value=value)])["lm.4.out@text"]
    torch.testing.assert_close(edited[0], base[0])  # the speech item is not named
    torch.testing.assert_close(edited[1:], base[1:] + torch.tensor([[1.0], [-2.0]]))


def test_set_without_units_replaces_the_whole_state(qwen_session):
    width = qwen_session.width("lm.5.out")
    target = torch.arange(width, dtype=torch.float32)
    out = qwen_session.run(ITEMS, ["lm.5.out"], ["last", "token:-2"], edits=[
        Edit("lm.5.out", "set", positions="last", value={"speech": target.numpy()})])
    torch.testing.assert_close(out["lm.5.out@last"][0], target)
    assert not torch.equal(out["lm.5.out@last"][1], target)
    with pytest.raises(UserError, match="'set' needs a value"):
        qwen_session.run(ITEMS, ["lm.5.out"], ["last"], edits=[Edit("lm.5.out", "set", positions="last")])


def test_the_view_gives_unembedding_rows(qwen_session):
    view = qwen_session.view
    rows = view.unembedding([3, 7, 3])
    weight = qwen_session.plugin.model.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(rows, weight[[3, 7, 3]])
    rows[0] = 0  # a copy: the model is not touched
    assert np.abs(qwen_session.plugin.model.lm_head.weight[3].detach().numpy()).sum() > 0
    with pytest.raises(UserError, match="outside the unembedding"):
        view.unembedding([10 ** 7])


def test_a_prompt_of_its_own_reads_a_text_bare(qwen_session):
    bare = qwen_session.prepare([Stimulus("p", text="Good")], lambda it: Prompt())
    (row,) = bare.rows
    s, e = row["lm"].spans["text"]
    ids = bare.inputs["input_ids"][0, row["lm"].offset + s:row["lm"].offset + e].tolist()
    assert qwen_session.plugin.tokenizer.decode(ids) == "Good"


def test_a_value_of_the_wrong_width_is_one_sentence(qwen_session):
    with pytest.raises(UserError, match="a vector of width 3 cannot be added to 64 units"):
        qwen_session.run(ITEMS, ["lm.4.out"], ["last"], edits=[Edit("lm.4.out", "add", value=np.ones(3))])
