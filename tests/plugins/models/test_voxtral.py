"""The Voxtral plugin on the tiny real architecture: the prompt is the processor's own chat template, the audio span
is exactly its [AUDIO] tokens, and clips longer than one chunk map onto encoder rows and LM tokens as documented
(``probe check`` in tests/core/test_check.py covers sites, hidden states, the lens, padding and decode steps)."""

from __future__ import annotations

import base64
import io

import pytest
import soundfile as sf
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.edits import Edit
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt
from lalm_probe.plugins.models.voxtral import Voxtral

pytest.importorskip("mistral_common")

AUDIO_ID = 24  # [AUDIO], as VoxtralProcessor hard-codes it


@pytest.fixture(scope="module")
def session(probe_cache):
    return Session(Voxtral.load("tiny"))


def processor_ids(plugin, conversation, **kwargs):
    """The processor's own chat template output for a conversation, with the tiny instance's 2 s chunks."""
    chunks = {"pad_to_multiple_of": plugin.chunk_samples, "max_source_positions": 2 * plugin.chunk_frames}
    return plugin.processor.apply_chat_template(conversation, processor_kwargs={"audio_kwargs": chunks}, **kwargs)


def test_the_processor_keeps_mistral_commons_tokenizer_after_loading(session):
    assert type(session.plugin.processor.tokenizer).__name__ == "MistralCommonBackend"
    assert session.plugin.tokenizer.convert_ids_to_tokens(AUDIO_ID) == "[AUDIO]"


@pytest.mark.parametrize("seconds, prefix", [(0.7, None), (2.5, None), (0.7, "It is")])
def test_the_prompt_is_the_processors_chat_template_and_the_audio_span_its_audio_tokens(session, tmp_path, seconds,
                                                                                        prefix):
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(330, seconds), SR, subtype="FLOAT")
    item = Stimulus("a", audio=str(wav), prompt="What do you hear?")
    conv = [{"role": "user", "content": [{"type": "audio", "path": str(wav)},
                                          {"type": "text", "text": "What do you hear?"}]}]
    if prefix:
        conv.append({"role": "assistant", "content": [{"type": "text", "text": prefix}]})
    want = processor_ids(session.plugin, conv, continue_final_message=bool(prefix))
    got = session.prepare([item], lambda it: Prompt(it.prompt, prefix))
    assert got.inputs["input_ids"].tolist() == want["input_ids"].tolist()
    # transformers re-encodes a path's audio at 16 bits before mistral-common reads it; the plugin hands the clip
    # over losslessly (float WAV), which is what the processor gives for the clip itself:
    torch.testing.assert_close(got.inputs["input_features"], want["input_features"], atol=0.05, rtol=0)
    buf = io.BytesIO()
    sf.write(buf, tone(330, seconds), SR, format="WAV", subtype="FLOAT")
    conv[0]["content"][0] = {"type": "audio", "base64": base64.b64encode(buf.getvalue()).decode()}
    exact = processor_ids(session.plugin, conv, continue_final_message=bool(prefix))
    torch.testing.assert_close(got.inputs["input_features"], exact["input_features"])
    ids = want["input_ids"][0].tolist()
    start, end = got.rows[0]["lm"].spans["audio"]
    assert ids[start - 1] == 25 and set(ids[start:end]) == {AUDIO_ID} and ids.count(AUDIO_ID) == end - start
    assert end - start == 25 * (1 if seconds < 2 else 2)  # 12.5 tokens per second, whole 2 s chunks
    assert session.plugin.tokenizer.decode(ids[slice(*got.rows[0]["lm"].spans["text"])]) == "What do you hear?"


def test_a_text_item_is_the_templated_text_alone(session):
    got = session.prepare([Stimulus("t", text="hello there", prompt="Repeat it.")])
    want = processor_ids(session.plugin, [{"role": "user", "content": [{"type": "text", "text":
                                                                          "hello there\nRepeat it."}]}])
    assert got.inputs["input_ids"].tolist() == want["input_ids"].tolist() and "input_features" not in got.inputs


def test_a_clip_longer_than_a_chunk_is_read_on_its_first_chunk_and_all_its_tokens(session):
    """Tiny chunks are 2 s: the 2.5 s clip takes chunks 0-1, the next clip chunk 2. The encoder reads a clip on its
    first chunk; the projector gives one row per LM audio token, every chunk in order, equal to the model's own
    audio embeddings."""
    long, short = Stimulus("long", audio=tone(200, 2.5), sample_rate=SR), Stimulus("short", audio=tone(300, 0.6),
                                                                                  sample_rate=SR)
    prepared = session.prepare([long, short])
    assert [r["audio_encoder"].row for r in prepared.rows] == [0, 2]
    assert [r["audio_encoder"].length for r in prepared.rows] == [100, 30]  # 20 ms frames, 100 per chunk
    proj = session.run([long, short], ["audio_encoder.projector"], ["all"])["audio_encoder.projector@all"]
    with torch.no_grad():
        embeds = session.plugin.model.get_audio_features(prepared.inputs["input_features"]).pooler_output
    torch.testing.assert_close(proj[0], embeds[:50])
    torch.testing.assert_close(proj[1], embeds[50:75])
    spans = [r["lm"].spans["audio"] for r in prepared.rows]
    assert [e - s for s, e in spans] == [len(p) for p in proj] == [50, 25]


def test_items_after_a_long_clip_read_and_edit_their_own_chunk(session):
    """The short clip's encoder row is chunk 2 in the batch: alone and after the long clip it reads the same, and an
    edit at its row changes what it changes alone."""
    long, short = Stimulus("long", audio=tone(200, 2.5), sample_rate=SR), Stimulus("short", audio=tone(300, 0.6),
                                                                                  sample_rate=SR)
    sites, vec = ["audio_encoder.1.out", "audio_encoder.projector", "lm.3.out"], torch.ones(64) * 3.0
    edit = [Edit("audio_encoder.0.out", "add", positions="mean", value=vec)]
    for edits in ([], edit):
        batch = session.run([long, short], sites, ["mean", "last"], edits=edits)
        alone = session.run([short], sites, ["mean", "last"], edits=edits)
        for key, value in alone.items():
            torch.testing.assert_close(batch[key][1:], value, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(session.run([short], sites, ["mean"], edits=edit)["lm.3.out@mean"],
                              session.run([short], sites, ["mean"])["lm.3.out@mean"])


def test_generation_decodes_after_the_prompt(session):
    gen = session.generate([Stimulus("a", audio=tone(440, 0.8), sample_rate=SR, prompt="Describe.")], 4,
                           ["lm.0.out"], ["step:1", "step:4"])
    assert gen.sequences.shape[1] == session.prepare([Stimulus("a", audio=tone(440, 0.8), sample_rate=SR,
                                                               prompt="Describe.")]).inputs["input_ids"].shape[1] + 4
    assert isinstance(gen.outputs[0]["output"], str) and gen.reads["lm.0.out@step:4"].shape == (1, 64)


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="Could not load voxtral checkpoint"):
        Voxtral.load(str(tmp_path))
