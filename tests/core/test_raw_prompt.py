"""``chat_template=false``: decoder LALMs read the input itself, so "the last token" is the input's (seed 000)."""

from __future__ import annotations

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt


def _last_tokens(session, items, prompt=Prompt()):
    prepared = session.prepare(items, prompt_fn=lambda it: prompt)
    ids = prepared.inputs["input_ids"]
    out = []
    for b, row in enumerate(prepared.rows):
        pos = row["lm"]
        out.append((ids[b, pos.offset + pos.length - 1].item(), pos, ids[b, pos.offset:pos.offset + pos.length]))
    return out


def test_raw_qwen2audio_ends_with_the_input_itself(probe_cache):
    from lalm_probe.plugins.models.qwen2audio import Qwen2Audio

    raw = Session(Qwen2Audio.load("tiny", options={"chat_template": False}))
    chat = Session(Qwen2Audio.load("tiny"))
    tok = raw.plugin.tokenizer
    items = [Stimulus("s", audio=tone(200, 0.5), sample_rate=SR), Stimulus("t", text="The cat sleeps")]
    (s_last, s_pos, s_ids), (t_last, t_pos, t_ids) = _last_tokens(raw, items)
    assert s_last == tok.convert_tokens_to_ids("<|audio_eos|>")  # the clip's own end marker closes the input
    start, end = s_pos.spans["audio"]
    assert (s_ids[start:end] == tok.convert_tokens_to_ids("<|AUDIO|>")).all() and start == 1 and end == len(s_ids) - 1
    assert t_ids.tolist() == tok("The cat sleeps", add_special_tokens=False)["input_ids"]  # nothing else
    assert t_pos.spans["text"] == (0, len(t_ids))
    (c_last, _, c_ids), _ = _last_tokens(chat, items)
    assert tok.decode(c_ids[-12:]).endswith("assistant\n")  # the template's header
    # the audio span holds the same audio, so the encoder's states agree with and without the template
    a = raw.run(items[:1], ["audio_encoder.1.out"], ["mean"])["audio_encoder.1.out@mean"]
    b = chat.run(items[:1], ["audio_encoder.1.out"], ["mean"])["audio_encoder.1.out@mean"]
    torch.testing.assert_close(a, b)
    (_, _, with_prompt), = _last_tokens(raw, items[:1], Prompt(user="Gender?", assistant_prefix="It is"))
    assert tok.decode(with_prompt).endswith("<|audio_eos|>Gender? It is")


def test_models_with_their_own_input_format_refuse_it(qwen_session):
    from lalm_probe.plugins.models.qwen2audio import Qwen2Audio

    class OwnFormat(Qwen2Audio):  # as Voxtral, whose format mistral-common builds
        name = "own-format"

        def render(self, item, prompt):
            return "x"

    plugin = qwen_session.plugin
    assert OwnFormat.option_defaults["chat_template"] is True
    with pytest.raises(UserError, match="builds its own input format"):
        OwnFormat(plugin.model, plugin.processor, "tiny").configure(chat_template=False)


def test_raw_ultravox_ends_with_the_input_itself(probe_cache):
    from lalm_probe.plugins.models.ultravox import Ultravox

    raw = Session(Ultravox.load("tiny", options={"chat_template": False}))
    tok = raw.plugin.tokenizer
    items = [Stimulus("s", audio=tone(200, 0.5), sample_rate=SR), Stimulus("t", text="The cat sleeps")]
    (s_last, s_pos, s_ids), (t_last, t_pos, t_ids) = _last_tokens(raw, items)
    assert s_ids[0].item() == tok.bos_token_id and s_pos.spans["audio"] == (1, len(s_ids))  # BOS, then the clip
    assert t_ids.tolist() == [tok.bos_token_id] + tok("The cat sleeps", add_special_tokens=False)["input_ids"]
