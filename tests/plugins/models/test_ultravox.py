"""The Ultravox plugin: the release's prompt token for token, spans on the positions the projector fills, options."""

from __future__ import annotations

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from lalm_probe.plugins.models.ultravox import Ultravox


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(Ultravox.load("tiny"))


def test_the_prompt_is_token_for_token_the_release_processor(session):
    """Ids written down from ``UltravoxPipeline.preprocess`` + ``UltravoxProcessor`` (as the arch test pins them):
    the user turn 'Hi <|audio|>' in the Llama 3 template, 7 EOS (260) for 1 s of audio (ceil(100 / 16))."""
    item = Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt="Hi")
    prepared = session.prepare([item])
    expected = ([256, 258, 84, 82, 68, 81, 259, 198, 198, 39, 72, 220] + [260] * 7
                + [260, 258, 64, 82, 82, 72, 82, 83, 64, 77, 83, 259, 198, 198])
    assert prepared.inputs["input_ids"][0].tolist() == expected
    lm = prepared.rows[0]["lm"]
    assert (lm.offset, lm.length, lm.spans) == (0, len(expected), {"audio": (12, 19), "text": (9, 11)})
    assert prepared.rows[0]["audio_encoder"].length == 50 and prepared.rows[0]["audio_stacked"].length == 7


def test_the_audio_span_is_where_the_projector_output_goes_in_a_padded_batch(session):
    """EOS also closes every turn, so ``probe check`` cannot count the placeholders; the span must be exactly the
    positions the model overwrites (``audio_token_start_idx`` for ``audio_token_len``)."""
    items = [Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt="What is this?"),
             Stimulus("b", audio=tone(220, 0.4), sample_rate=SR, prompt="Describe it in a few words.")]
    prepared = session.prepare(items)
    starts, lens = prepared.inputs["audio_token_start_idx"].tolist(), prepared.inputs["audio_token_len"].tolist()
    for row, start, n in zip(prepared.rows, starts, lens):
        lm = row["lm"]
        assert (lm.offset + lm.spans["audio"][0], lm.spans["audio"][1] - lm.spans["audio"][0]) == (start, n)


def test_the_projector_is_read_per_clip_on_its_stacked_tokens(session):
    item = Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt="Hi")
    reads = session.run([item], ["audio_encoder.projector"], ["all"])
    prepared = session.prepare([item])
    with torch.no_grad():
        ref = session.plugin.model.encode_audio(prepared.inputs["audio_values"], prepared.inputs["audio_lens"])
    torch.testing.assert_close(reads["audio_encoder.projector@all"][0], ref[0, :7])


def test_text_items_and_assistant_prefixes_follow_the_chat_template(session):
    item = Stimulus("t", text="hello world", prompt="Repeat it.")
    prepared = session.prepare([item], lambda it: Prompt(it.prompt, "Sure:"))
    text = session.plugin.tokenizer.decode(prepared.inputs["input_ids"][0])
    assert text.endswith("user<|end_header_id|>\n\nhello world\nRepeat it.<|eot_id|><|start_header_id|>assistant"
                         "<|end_header_id|>\n\nSure:")
    assert "audio" not in prepared.rows[0]["lm"].spans and "audio_encoder" not in prepared.rows[0]


def test_per_part_sources_are_options_and_remote_code_is_refused_in_one_sentence():
    with pytest.raises(UserError, match="does not exist"):
        Ultravox.load("tiny", options={"text_model": "./no/such/llama"})
    with pytest.raises(UserError, match="transformers 4"):
        Ultravox.load("tiny", options={"trust_remote_code": "true"})
