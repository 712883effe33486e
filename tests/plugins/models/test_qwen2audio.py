"""The Qwen2-Audio plugin on the tiny real architecture: sites, spans, errors, loading (the conformance checks in
tests/core/test_check.py cover padding, hidden states, the lens and decode steps)."""

from __future__ import annotations

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.qwen2audio import Qwen2Audio


def items():
    return [Stimulus("long", audio=tone(440, 1.0), sample_rate=SR, prompt="What is this?"),
            Stimulus("short", audio=tone(220, 0.4), sample_rate=SR, prompt="Describe the sound in detail, please."),
            Stimulus("text", text="hello world", prompt="Repeat it.")]


def test_tiny_round_trips_through_from_pretrained(qwen_session, probe_cache):
    again = Qwen2Audio.load("tiny")  # second load reads the cached save_pretrained folder
    for (n1, p1), (n2, p2) in zip(qwen_session.plugin.model.named_parameters(), again.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_every_site_of_both_stacks_is_readable(qwen_session):
    plugin = qwen_session.plugin
    audio_items = items()[:2]
    for stack in ("audio_encoder", "lm"):
        st = plugin.resolved[stack]
        patterns = [f"{stack}.*.{c}" for c in st.paths]
        out = qwen_session.run(audio_items, patterns, ["last", "mean"])
        assert len(out) == st.num_layers * len(st.paths) * 2
        for key, value in out.items():
            assert value.shape[0] == 2 and torch.isfinite(value).all(), key
    proj = qwen_session.run(audio_items, ["audio_encoder.projector"], ["all"])["audio_encoder.projector@all"]
    assert [p.shape for p in proj] == [(25, 64), (10, 64)]  # read on the pooled axis: one row per audio token


def test_row_metadata_marks_audio_and_text_spans(qwen_session):
    prepared = qwen_session.prepare(items())
    audio_id = qwen_session.plugin.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    ids = prepared.inputs["input_ids"]
    for b, row in enumerate(prepared.rows):
        lm = row["lm"]
        valid = ids[b, lm.offset:lm.offset + lm.length].tolist()
        if "audio" in lm.spans:
            s, e = lm.spans["audio"]
            assert set(valid[s:e]) == {audio_id} and audio_id not in valid[:s] + valid[e:]
        assert "text" in lm.spans
    # 25 audio tokens per second (Qwen2-Audio's rate): 1 s -> 25, 0.4 s -> 10
    assert [r["lm"].spans["audio"][1] - r["lm"].spans["audio"][0] for r in prepared.rows[:2]] == [25, 10]


def test_bad_sites_and_positions_are_clear_errors(qwen_session):
    batch = items()[:1]
    with pytest.raises(UserError, match="out of range"):
        qwen_session.run(batch, ["lm.99.out"])
    with pytest.raises(UserError, match="unknown stack"):
        qwen_session.run(batch, ["vision.0.out"])
    with pytest.raises(UserError, match="unknown component"):
        qwen_session.run(batch, ["lm.0.nope"])
    with pytest.raises(UserError, match="out of range"):
        qwen_session.run(batch, ["lm.0.out"], ["token:5000"])
    with pytest.raises(UserError, match="no 'audio' span"):
        qwen_session.run(items()[2:], ["lm.0.out"], ["audio"])
    with pytest.raises(UserError, match="does not pass through"):
        qwen_session.run(items()[2:], ["audio_encoder.0.out"])


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="Could not load qwen2audio checkpoint"):
        Qwen2Audio.load(str(tmp_path))  # an empty local directory
    with pytest.raises(UserError, match="tiny for an offline smoke test"):
        Qwen2Audio.load("nobody/no-such-model")
