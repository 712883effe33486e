"""The SALMONN plugin: the release's prompt wrap token for token, seed 001's speech/text split as spans, the window
Q-Former read per clip, and a local folder that names its parts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import ModelPlugin
from lalm_probe.plugins.models.salmonn import Salmonn


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(Salmonn.load("tiny"))


def test_the_prompt_is_token_for_token_the_release_prompt_wrap(session):
    """Ids written down from ``cli_inference.py`` + ``prompt_wrap`` (as the arch test pins them):
    ``[BOS] 'USER: <Speech>' [5 windows] '</Speech> Hi\\nASSISTANT:'``."""
    prepared = session.prepare([Stimulus("a", audio=tone(440, 1.0), sample_rate=SR, prompt=" Hi ")])
    before = [52, 50, 36, 49, 25, 220, 27, 50, 79, 68, 68, 66, 71, 29]
    after = [27, 14, 50, 79, 68, 68, 66, 71, 29, 220, 39, 72, 198, 32, 50, 50, 40, 50, 51, 32, 45, 51, 25]
    assert prepared.inputs["input_ids"][0].tolist() == [257] + before + [259] * 5 + after
    row = prepared.rows[0]
    assert row["lm"].spans == {"audio": (15, 20), "text": (30, 32), "item": (15, 20)}
    assert (row["audio_encoder"].length, row["beats"].length, row["windows"].length) == (50, 48, 5)


def test_seed_001_split_a_speech_item_with_its_text_and_a_text_item(session):
    """App. B.3: SALMONN reads speech and text in one input, split along the sequence into a speech and a text part.
    A speech item carrying its transcription gives both parts in one row; a text item's ``item`` span is its text."""
    tok = session.plugin.tokenizer
    paired = Stimulus("p", audio=tone(440, 1.0), sample_rate=SR, text="the cat sat")
    text = Stimulus("t", text="the cat sat", prompt="Repeat it.")
    for item in (paired, text):
        prepared = session.prepare([item])
        lm = prepared.rows[0]["lm"]
        valid = prepared.inputs["input_ids"][0, lm.offset:].tolist()
        assert tok.decode(valid[slice(*lm.spans["text"])]) == "the cat sat"
        assert lm.spans["item"] == lm.spans["audio" if item.has_audio else "text"]
    assert "audio" not in lm.spans and "audio_encoder" not in prepared.rows[0]


def test_the_q_former_output_and_its_projection_are_read_per_clip_one_position_per_window(session):
    """The Q-Former's batch axis holds windows (clip c owns windows 5c..5c+4); the sites read them per clip, and the
    projection is what fills the LM's speech span."""
    items = [Stimulus("a", audio=tone(440, 1.0), sample_rate=SR), Stimulus("b", audio=tone(220, 1.6), sample_rate=SR)]
    reads = session.run(items, ["audio_encoder.projector", "audio_encoder.qformer"], ["all"])
    prepared = session.prepare(items)
    inputs = prepared.inputs
    with torch.no_grad():
        ref = session.plugin.model.encode_speech(inputs["input_features"], inputs["raw_wav"], inputs["raw_wav_lens"])
    for b in range(2):
        torch.testing.assert_close(reads["audio_encoder.projector@all"][b], ref[b])
        assert reads["audio_encoder.qformer@all"][b].shape == (5, session.width("audio_encoder.qformer"))


def test_a_local_folder_names_its_parts_in_decode_config_s_model_block(tmp_path):
    """The tiny folder is the form: ``config.json`` = {"model": {ckpt, whisper_path, beats_path, llama_path}}."""
    folder = Salmonn.source("tiny")
    block = json.loads((folder / "config.json").read_text())["model"]
    assert set(block) == {"ckpt", "whisper_path", "beats_path", "llama_path"}
    with pytest.raises(UserError, match="none.pt' does not exist"):  # an option overrides the folder's part
        Salmonn.load(str(folder), options={"beats": str(tmp_path / "none.pt")})
    (tmp_path / "config.json").write_text(json.dumps({"model": {"whisper_path": "x"}}))
    with pytest.raises(UserError, match="names no 'ckpt'"):
        Salmonn.load(str(tmp_path))


def test_the_plugin_is_a_declaration_with_its_load_options():
    assert issubclass(Salmonn, ModelPlugin) and set(Salmonn.load_options) == {"whisper", "beats", "llama",
                                                                                   "allow_pickle"}
