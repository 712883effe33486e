"""Ultravox 0.5 on transformers parts: release key names, the release prompt, round trip, generation, padding."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import checkpoint_keys, clips, llama_keys, whisper_encoder_keys
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.arch.ultravox import UltravoxConfig, UltravoxModel
from lalm_probe.plugins.models.arch.ultravox_io import load_ultravox

# whisper-large-v3-turbo's encoder (audio_model_id of both v0.5 releases)
TURBO = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
             max_source_positions=1500, decoder_layers=4, decoder_attention_heads=20, decoder_ffn_dim=5120)
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
PROJECTOR = {f"multi_modal_projector.{n}.weight" for n in ("ln_pre", "linear_1", "ln_mid", "linear_2")}


@pytest.mark.parametrize("llama, layers, tied", [(LLAMA_1B, 16, True), (LLAMA_8B, 32, False)])
def test_real_size_keys_are_the_released_names(llama, layers, tied):
    """Keys written from ``ultravox_model.py`` (``audio_tower`` = Whisper encoder, ``multi_modal_projector`` with
    ``ln_mid`` from v0.5, ``language_model`` = LlamaForCausalLM; Llama 3.2 1B ties ``lm_head`` so its checkpoint has
    none)."""
    config = UltravoxConfig(audio_config=TURBO, text_config=llama, hidden_size=4096, projector_ln_mid=True)
    with torch.device("meta"):
        model = UltravoxModel(config)
    expected = (whisper_encoder_keys("audio_tower.", 32) | PROJECTOR
                | llama_keys("language_model.", layers, lm_head=not tied))
    assert checkpoint_keys(model) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["multi_modal_projector.linear_1.weight"] == (4096, 1280 * 8)  # 8 stacked encoder frames
    assert shapes["multi_modal_projector.linear_2.weight"] == (llama["hidden_size"], 2048)  # after SwiGLU halves


def test_prompt_is_token_for_token_the_release_processor(ultravox):
    """``UltravoxPipeline.preprocess`` appends `` <|audio|>`` to the user prompt; ``UltravoxProcessor`` splits the
    chat text there, tokenizes both halves without special tokens and puts ceil(100 mel frames / (2 * 8)) = 7 EOS
    (``<|eot_id|>`` = 260) between. Tiny tokenizer: printable ASCII c -> ord(c) - 33, space 220, newline 198,
    specials 256 ``<|begin_of_text|>``, 258/259 header start/end, 260 ``<|eot_id|>``."""
    proc = ultravox.processor
    text = proc.render("Hi", audio=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi <|audio|><|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    batch = proc([text], [clips()[0]], user_texts=["Hi"])
    expected = ([256, 258, 84, 82, 68, 81, 259, 198, 198, 39, 72, 220] + [260] * 7
                + [260, 258, 64, 82, 82, 72, 82, 83, 64, 77, 83, 259, 198, 198])
    assert batch.inputs["input_ids"][0].tolist() == expected
    assert batch.inputs["audio_token_start_idx"].tolist() == [12]
    assert batch.inputs["audio_token_len"].tolist() == [7]
    row = batch.rows[0]
    assert (row.audio, row.text, row.audio_frames) == ((12, 19), (9, 11), 50)
    assert row.encoder_frames == {"audio_tower": 50}


def test_audio_span_covers_exactly_the_placeholder_positions(ultravox):
    """The LM's input embeddings are the projector output on the audio span and token embeddings everywhere else."""
    model, proc = ultravox.model, ultravox.processor
    texts = [proc.render("What is this?", audio=True), proc.render("Describe it.", audio=True)]
    batch = proc(texts, clips())
    seen = {}
    hook = model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch.inputs)
        audio = model.encode_audio(batch.inputs["audio_values"], batch.inputs["audio_lens"])
        tokens = model.get_input_embeddings()(batch.inputs["input_ids"])
    hook.remove()
    for b, row in enumerate(batch.rows):
        span = torch.zeros(batch.inputs["input_ids"].shape[1], dtype=torch.bool)
        span[row.offset + row.audio[0]: row.offset + row.audio[1]] = True
        n = row.audio[1] - row.audio[0]
        assert torch.equal(seen["embeds"][b, span], audio[row.clip, :n])
        assert torch.equal(seen["embeds"][b, ~span], tokens[b, ~span])
    assert [r.audio[1] - r.audio[0] for r in batch.rows] == [7, 3]  # ceil(100/16), ceil(40/16)


def test_tiny_round_trip_gives_bit_identical_logits(ultravox):
    proc = ultravox.processor
    batch = proc([proc.render("Hi", audio=True)], [clips()[0]])
    built, loaded = ultravox.built.state_dict(), ultravox.model.state_dict()
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)
    with torch.no_grad():
        assert torch.equal(ultravox.built(**batch.inputs).logits, ultravox.model(**batch.inputs).logits)


def test_greedy_generate_with_cache_equals_a_hand_run_forward_loop(ultravox):
    model, proc = ultravox.model, ultravox.processor
    batch = proc([proc.render("Hi", audio=True), proc.render("Go", audio=False)], [clips()[1], None])
    out = model.generate(**batch.inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    inputs = dict(batch.inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    inputs.pop("position_ids")
    with torch.no_grad():
        for _ in range(5):  # full recompute every step, no cache
            logits = model(input_ids=ids, attention_mask=mask, **inputs).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


def test_padded_batch_gives_each_item_its_own_logits(ultravox):
    proc, model = ultravox.processor, ultravox.model
    a, b = clips()
    texts = [proc.render("What is this?", audio=True), proc.render("Describe it.", audio=True),
             proc.render("Say hello.", audio=False)]
    audios = [a, b, None]
    batch = proc(texts, audios)
    with torch.no_grad():
        together = model(**batch.inputs).logits
        for i, row in enumerate(batch.rows):
            alone = model(**proc([texts[i]], [audios[i]]).inputs).logits[0]
            torch.testing.assert_close(together[i, row.offset:], alone, atol=1e-5, rtol=1e-5)


def test_audio_longer_than_the_window_is_split_into_consecutive_chunks(ultravox):
    """The tiny encoder window is 2 s (200 mel frames): 3 s become chunks of 200 and 100 frames, 13 + 7 tokens in
    one span, each chunk encoded on its own (``_chunk_and_pad_audio``)."""
    from helpers import tone

    proc = ultravox.processor
    batch = proc([proc.render("Hi", audio=True)], [tone(330, 3.0)])
    assert batch.inputs["audio_lens"].tolist() == [200, 100]
    assert batch.inputs["audio_token_len"].tolist() == [13, 7]
    assert batch.inputs["audio_batch_size"].tolist() == [2]
    assert batch.rows[0].audio == (12, 32)
    with torch.no_grad():
        assert torch.isfinite(ultravox.model(**batch.inputs).logits).all()


def test_unavailable_parts_are_one_sentence_errors(ultravox, tmp_path):
    with pytest.raises(UserError, match="config.json' is missing"):
        load_ultravox(tmp_path)
    with pytest.raises(UserError, match="hf download tiny/llama"):  # the checkpoint's own text_model_id, offline
        load_ultravox(ultravox.paths["ultravox"], audio_model=str(ultravox.paths["whisper"]))
    with pytest.raises(UserError, match="does not exist"):
        load_ultravox("./no/such/dir")
    with pytest.raises(UserError, match="transformers 4"):
        load_ultravox(ultravox.paths["ultravox"], trust_remote_code=True)


def test_an_assistant_prefix_and_a_system_turn_render_in_the_chat_template(ultravox):
    proc = ultravox.processor
    text = proc.render("Who speaks?", audio=True, system="Be brief.", assistant_prefix="The speaker is")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWho speaks? <|audio|><|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nThe speaker is")
