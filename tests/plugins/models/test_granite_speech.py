"""The Granite Speech plugin on the tiny real architecture: the processor's own prompt and audio tokens, the Q-Former
read on its queries, padded batches equal to clips alone (which the model itself does not give), the LoRA as sites
and switched as Granite's generate switches it, and the mel spectrogram standing in for torchaudio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Stimulus
from lalm_probe.core.engine import Session
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.granite_speech import GraniteSpeech
from lalm_probe.plugins.models.lora import apply_adapter, lora_layers
from lalm_probe.plugins.models.melspec import MelSpectrogram

AUDIO = "<|audio|>"


@pytest.fixture(scope="module")
def session(probe_cache):
    return Session(GraniteSpeech.load("tiny"))


def clips():
    return [Stimulus("short", audio=tone(220, 0.6), sample_rate=SR, prompt="What is this?"),
            Stimulus("long", audio=tone(330, 1.7), sample_rate=SR, prompt="Transcribe the speech."),
            Stimulus("mid", audio=tone(440, 1.1), sample_rate=SR, prompt="Is it a tone?")]


def test_the_prompt_is_the_processors_chat_template_and_the_audio_span_its_audio_tokens(session):
    proc = session.plugin.processor
    item = clips()[1]
    text = proc.apply_chat_template([{"role": "user", "content": AUDIO + item.prompt}], add_generation_prompt=True,
                                    tokenize=False)
    assert text == f"<|start_of_role|>user<|end_of_role|>{AUDIO}{item.prompt}<|end_of_text|>\n" \
                   "<|start_of_role|>assistant<|end_of_role|>"
    want = proc(text=[text], audio=[item.audio], return_tensors="pt")
    got = session.prepare([item])
    assert got.inputs["input_ids"].tolist() == want["input_ids"].tolist()
    torch.testing.assert_close(got.inputs["input_features"], want["input_features"])  # one clip: no padding
    ids = want["input_ids"][0].tolist()
    audio_id = session.plugin.tokenizer.convert_tokens_to_ids(AUDIO)
    start, end = got.rows[0]["lm"].spans["audio"]
    assert set(ids[start:end]) == {audio_id} and ids.count(audio_id) == end - start
    assert end - start == int(want["input_features_mask"].sum()) == 3 * int(np.ceil(85 / 15))  # 1.7 s: 85 frames
    assert session.plugin.tokenizer.decode(ids[slice(*got.rows[0]["lm"].spans["text"])]) == item.prompt


def test_the_qformer_is_read_on_its_queries_one_per_lm_audio_token(session):
    items = clips()
    prepared = session.prepare(items)
    reads = session.run(items, ["projector.1.out", "projector.output"], ["all"])
    with torch.no_grad():
        for b, it in enumerate(items):
            alone = session.prepare([it]).inputs
            embeds = session.plugin.model.get_audio_features(alone["input_features"]).pooler_output[0]
            n = prepared.rows[b]["lm"].spans["audio"][1] - prepared.rows[b]["lm"].spans["audio"][0]
            assert len(reads["projector.1.out@all"][b]) == len(reads["projector.output@all"][b]) == n
            torch.testing.assert_close(reads["projector.output@all"][b], embeds[:n], atol=1e-5, rtol=1e-4)


def test_a_padded_batch_equals_each_clip_alone_which_the_model_alone_does_not_give(session):
    """With the processor's own batch (padded audio, no masking) the short clip's encoder output differs from the clip
    alone; with the plugin's batch it is the same."""
    items, model, proc = clips()[:2], session.plugin.model, session.plugin.processor

    def encoder(features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.get_audio_features(features).last_hidden_state

    alone = encoder(session.prepare(items[:1]).inputs["input_features"])[0]
    theirs = encoder(proc(text=[AUDIO, AUDIO], audio=[it.audio for it in items], return_tensors="pt",
                          padding=True)["input_features"])[0, :len(alone)]
    ours = encoder(session.prepare(items).inputs["input_features"])[0, :len(alone)]
    assert (theirs - alone).abs().max() > 1e-2
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-4)


def test_the_lora_parts_are_sites_and_make_the_adapted_projections(session):
    plugin = session.plugin
    assert plugin.describe()["lora"]["components"] == {"q_a": 4, "q_b": 64, "v_a": 4, "v_b": 32}
    reads = session.run(clips()[:1], ["lm.1.attn_norm", "lm.1.attn_q", "lora.1.q_a", "lora.1.q_b"], ["last"])
    q_proj = plugin.model.model.language_model.layers[1].self_attn.q_proj
    with torch.no_grad():
        a = q_proj.lora_A["default"](reads["lm.1.attn_norm@last"])
        b = q_proj.lora_B["default"](a)
        base = q_proj.base_layer(reads["lm.1.attn_norm@last"])
    torch.testing.assert_close(reads["lora.1.q_a@last"], a)
    torch.testing.assert_close(reads["lora.1.q_b@last"], b)
    torch.testing.assert_close(reads["lm.1.attn_q@last"], base + q_proj.scaling * b)
    assert q_proj.scaling == 2.0 and b.abs().max() > 1e-3  # alpha 8 / rank 4; the adapter is not a no-op


def test_the_lora_is_on_for_audio_and_off_for_text_as_in_granites_generate(session):
    layers = lora_layers(session.plugin.model)
    assert len(layers) == 8  # q_proj and v_proj of 4 layers
    speech, text = clips()[:1], [Stimulus("t", text="hello there", prompt="Repeat it.")]

    def lm(items):
        return session.run(items, ["lm.3.out"], ["last"])["lm.3.out@last"]

    with_adapter = [lm(speech), lm(text)]
    for layer in layers:
        layer.scaling = 0.0  # the adapter's contribution removed, whatever its switch says
    try:
        without = [lm(speech), lm(text)]
    finally:
        for layer in layers:
            layer.scaling = 2.0
    assert not torch.allclose(with_adapter[0], without[0])
    torch.testing.assert_close(with_adapter[1], without[1])
    assert "lora" not in session.prepare(text).rows[0] and "lora" in session.prepare(speech).rows[0]
    gen = session.generate(speech, 3, ["lora.0.v_b"], ["step:1", "step:3"])
    assert gen.reads["lora.0.v_b@step:3"].abs().max() > 0  # still on at later decode steps


def test_adapter_weights_load_under_either_transformers_prefix():
    layers = torch.nn.ModuleList([torch.nn.Module()])
    layers[0].self_attn = torch.nn.Module()
    layers[0].self_attn.q_proj = torch.nn.Linear(8, 8)
    config = {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    for prefix in ("base_model.model.language_model.model.", "base_model.model.model.language_model."):
        layer = torch.nn.ModuleList([torch.nn.Module()])
        layer[0].self_attn = torch.nn.Module()
        layer[0].self_attn.q_proj = torch.nn.Linear(8, 8)
        assert apply_adapter(layer, config, {f"{prefix}layers.0.self_attn.q_proj.lora_A.weight": a,
                                             f"{prefix}layers.0.self_attn.q_proj.lora_B.weight": b}, "t") == ["q_proj"]
        torch.testing.assert_close(layer[0].self_attn.q_proj.lora_B["default"].weight, b)
    with pytest.raises(UserError, match="only plain LoRA"):
        apply_adapter(layers, {**config, "use_dora": True}, {}, "t")


def test_the_torchaudio_stand_in_matches_librosa():
    librosa = pytest.importorskip("librosa")
    y = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    ours = MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=80)(
        torch.from_numpy(y)[None])[0].numpy()
    ref = librosa.feature.melspectrogram(y=y.astype(np.float64), sr=16000, n_fft=512, hop_length=160, win_length=400,
                                         window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=80,
                                         fmin=0.0, fmax=8000.0, htk=True, norm=None)
    assert ours.shape == ref.shape and np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="Could not load granite-speech checkpoint"):
        GraniteSpeech.load(str(tmp_path))
