"""The Qwen-Audio-Chat plugin: ``make_context`` token for token, the audio span on the placeholders, and the fused
attention and gated MLP mapped to the canonical sites they are."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.plugins.models.qwen_audio_chat import QwenAudioChat

# The tiny tokenizer's ids, as the arch test writes them down from tiktoken's BPE on its ranks.
IM_START, IM_END, NL, PAD, AUDIO, END_AUDIO = 292, 293, [10], 499, 3811, 3812
SYSTEM = [115, 121, 115, 116, 101, 109]
USER = [117, 115, 259]
ASSISTANT = [97, 115, 115, 261, 116, 290]
HELPFUL = [89, 262, 270, 266, 270, 32, 257, 108, 112, 102, 117, 108, 270, 115, 115, 261, 116, 290, 46]
AUDIO_1 = [65, 117, 100, 105, 111, 32, 49, 58]  # "Audio 1:"
QUESTION = [281, 277, 275, 289, 63]  # "What is the gender?"


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(QwenAudioChat.load("tiny"))


def test_the_prompt_is_token_for_token_make_context(session):
    """``make_context`` (ChatML, default system) around ``from_list_format``'s ``Audio 1:<audio>…</audio>\\n`` and
    the question; 0.5 s -> 12 audio tokens between the tags."""
    prepared = session.prepare([Stimulus("a", audio=tone(200, 0.5), sample_rate=SR, prompt="What is the gender?")])
    content = AUDIO_1 + [AUDIO] + [PAD] * 12 + [END_AUDIO] + NL + QUESTION
    before = [IM_START] + SYSTEM + NL + HELPFUL + [IM_END] + NL + [IM_START] + USER + NL
    expected = before + content + [IM_END] + NL + [IM_START] + ASSISTANT + NL
    assert prepared.inputs["input_ids"][0].tolist() == expected
    start = len(before) + len(AUDIO_1) + 1  # the first placeholder, after <audio>
    assert prepared.rows[0]["lm"].spans == {"audio": (start, start + 12), "text": (start + 14, start + 19)}
    assert prepared.rows[0]["audio_encoder"].length == 25 and prepared.rows[0]["audio_pooled"].length == 12


def test_the_audio_encoder_output_lands_on_the_audio_span(session):
    item = Stimulus("a", audio=tone(200, 0.5), sample_rate=SR, prompt="What is the gender?")
    prepared = session.prepare([item])
    lm = prepared.rows[0]["lm"]
    with torch.no_grad():
        embeds = session.plugin.model.transformer._insert_audio(
            session.plugin.model.transformer.wte(prepared.inputs["input_ids"]), prepared.inputs["input_ids"],
            prepared.inputs["input_audios"], prepared.inputs["input_audio_lengths"])
    span = embeds[0, lm.offset + lm.spans["audio"][0]: lm.offset + lm.spans["audio"][1]].mean(0)
    reads_all = session.run([item], ["audio_encoder.projector"], ["all"])["audio_encoder.projector@all"][0]
    torch.testing.assert_close(reads_all.mean(0), span)


def test_the_fused_projection_is_attn_qkv_and_w2_is_the_gate(session):
    """``attn_qkv`` is ``c_attn`` (q, k, v side by side); the MLP computes ``c_proj(w1(x) * silu(w2(x)))``, so
    ``mlp_act`` = ``mlp_up`` * silu(``mlp_gate``) with ``w1`` the up and ``w2`` the gate projection."""
    item = Stimulus("t", text="hello world", prompt="Repeat it.")
    sites = ["lm.1.attn_qkv", "lm.1.mlp_up", "lm.1.mlp_gate", "lm.1.mlp_act"]
    reads = session.run([item], sites, ["last"])
    assert session.width("lm.1.attn_qkv") == 3 * session.width("lm.1.out")
    assert "attn_q" not in session.plugin.resolved["lm"].paths
    up, gate = reads["lm.1.mlp_up@last"], reads["lm.1.mlp_gate@last"]
    torch.testing.assert_close(reads["lm.1.mlp_act@last"], up * F.silu(gate))
