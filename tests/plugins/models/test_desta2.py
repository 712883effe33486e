"""The DeSTA2 plugin: the release's two-stage prompt token for token, the transcription from the model's Whisper,
spans on the positions the connector fills."""

from __future__ import annotations

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.plugins.models.desta2 import Desta2


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(Desta2.load("tiny"))


def test_the_prompt_is_token_for_token_the_release_process_text(session, monkeypatch):
    """Ids written down from ``DestaModel.chat`` / ``process_text`` (as the arch test pins them) for no system turn
    and the transcription ' ok': the 8 (tiny prompt size) audio slots at ``audio_position`` = 10, the transcription
    after the audio turn, then the user's 'Hi'."""
    plugin = session.plugin
    plugin.configure(system="")
    monkeypatch.setattr(plugin.processor, "transcribe", lambda model, feats: [" ok"] * len(feats))
    try:
        prepared = session.prepare([Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt="Hi")])
    finally:
        plugin.configure(system=Desta2.option_defaults["system"])
    left = [256, 256, 258, 64, 84, 67, 72, 78, 259, 198]
    right = [198, 220, 78, 74, 260, 258, 84, 82, 68, 81, 259, 198, 198, 39, 72, 260,
             258, 64, 82, 82, 72, 82, 83, 64, 77, 83, 259, 198, 198]
    assert prepared.inputs["input_ids"][0].tolist() == left + [260] * 8 + right
    assert prepared.rows[0]["lm"].spans == {"audio": (10, 18), "transcription": (19, 22), "text": (31, 33)}
    assert prepared.rows[0]["audio_encoder"].length == 50 and prepared.rows[0]["audio_prompts"].length == 8


def test_the_transcription_is_the_model_s_own_whisper_output_and_sits_at_its_span(session):
    items = [Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt="What is said?"),
             Stimulus("b", audio=tone(220, 0.4), sample_rate=SR)]
    prepared = session.prepare(items)
    proc, model = session.plugin.processor, session.plugin.model
    said = proc.transcribe(model, proc.features([tone(440, 1.0), tone(220, 0.4)]))
    assert prepared.meta["transcriptions"] == said
    tok = session.plugin.tokenizer
    for b, (row, text) in enumerate(zip(prepared.rows, said)):
        lm = row["lm"]
        valid = prepared.inputs["input_ids"][b, lm.offset:].tolist()
        if text:
            assert tok.decode(valid[slice(*lm.spans["transcription"])]) == text
        start = prepared.inputs["audio_token_start_idx"][b].item()
        assert lm.offset + lm.spans["audio"][0] == start and lm.spans["audio"][1] - lm.spans["audio"][0] == 8


def test_the_connector_output_is_read_per_clip(session):
    item = Stimulus("a", audio=tone(440, 1.0), sample_rate=SR)
    reads = session.run([item], ["audio_encoder.connector"], ["all"])
    prepared = session.prepare([item])
    with torch.no_grad():
        ref = session.plugin.model.speech_perception(prepared.inputs["input_features"])
    torch.testing.assert_close(reads["audio_encoder.connector@all"][0], ref[0])


def test_generated_outputs_carry_the_transcription(session):
    gen = session.generate([Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt="Hi")], 3)
    assert set(gen.outputs[0]) == {"output", "transcription"}
