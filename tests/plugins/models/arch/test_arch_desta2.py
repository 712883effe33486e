"""DeSTA2 on transformers parts: release key names, the release's two-stage prompt, round trip, generation, padding."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import checkpoint_keys, clips, llama_keys, whisper_encoder_keys
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.arch.desta2 import Desta2Config, DestaModel
from lalm_probe.plugins.models.arch.desta2_io import load_desta2

WHISPER_SMALL = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_mel_bins=80,
                     vocab_size=51865, max_source_positions=1500, max_target_positions=448)
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def whisper_decoder_keys(prefix: str, layers: int) -> set[str]:
    keys = {f"{prefix}{n}" for n in ("embed_tokens.weight", "embed_positions.weight", "layer_norm.weight",
                                      "layer_norm.bias")}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        for att in ("self_attn", "encoder_attn"):
            keys |= {f"{p}{att}.{n}" for n in ("k_proj.weight", "v_proj.weight", "v_proj.bias", "q_proj.weight",
                                               "q_proj.bias", "out_proj.weight", "out_proj.bias")}
            keys |= {f"{p}{att}_layer_norm.weight", f"{p}{att}_layer_norm.bias"}
        keys |= {p + n for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight",
                                 "final_layer_norm.bias")}
    return keys


def connector_keys() -> set[str]:
    """``qformer_connector.pth``: ``QformerConnector.state_dict()`` (4 layer prompts for whisper-small, a 2-layer
    ``BertEncoder`` with cross-attention, ``proj`` = LayerNorm + Linear)."""
    keys = {f"layer_prompts.{i}" for i in range(4)} | {"layer_weights", "proj.0.weight", "proj.0.bias",
                                                         "proj.1.weight", "proj.1.bias"}
    for i in range(2):
        p = f"qformer.layer.{i}."
        for att in ("attention", "crossattention"):
            keys |= {f"{p}{att}.self.{w}.{t}" for w in ("query", "key", "value") for t in ("weight", "bias")}
            keys |= {f"{p}{att}.output.{w}.{t}" for w in ("dense", "LayerNorm") for t in ("weight", "bias")}
        keys |= {f"{p}intermediate.dense.{t}" for t in ("weight", "bias")}
        keys |= {f"{p}output.{w}.{t}" for w in ("dense", "LayerNorm") for t in ("weight", "bias")}
    return keys


def test_real_size_keys_are_the_released_names():
    """``DestaModel``: ``speech_perception.whisper`` (whisper-small, ``proj_out`` tied to the decoder embeddings),
    ``speech_perception.connector`` (the keys of ``qformer_connector.pth``), ``llama`` (Llama 3 8B Instruct)."""
    config = Desta2Config(whisper_config=WHISPER_SMALL, llama_config=LLAMA3_8B)
    with torch.device("meta"):
        model = DestaModel(config)
    expected = (whisper_encoder_keys("speech_perception.whisper.model.encoder.", 12)
                | whisper_decoder_keys("speech_perception.whisper.model.decoder.", 12)
                | {f"speech_perception.connector.{k}" for k in connector_keys()} | llama_keys("llama.", 32))
    assert checkpoint_keys(model) == expected
    assert set(model.speech_perception.connector.state_dict()) == connector_keys()
    assert model.speech_perception.connector.target_layer_ids == [2, 5, 8, 11]
    qformer = model.speech_perception.connector.qformer
    assert tuple(qformer.layer[0].intermediate.dense.weight.shape) == (3072, 768)  # BertConfig() default


def test_prompt_is_token_for_token_the_release_process_text(desta2):
    """``process_text``: chat text split at the audio path; transcription put right after it; audio_position =
    len(tokenize(left)) = 10; ``tokenizer(left + right)`` adds a second BOS, so the 8 (tiny prompt_size) audio
    slots land at index 10 -- between the two newline tokens after ``audio<|end_header_id|>``, one token before
    the split. Tiny tokenizer: ASCII c -> ord(c) - 33, space 220, newline 198, 256 BOS, 258/259 header, 260 eot."""
    proc = desta2.processor
    msgs = proc.messages("Hi", audio=True, system=None)
    batch = proc([msgs], [clips()[0]], [" ok"], user_texts=["Hi"])
    left = [256, 256, 258, 64, 84, 67, 72, 78, 259, 198]
    right = [198, 220, 78, 74, 260, 258, 84, 82, 68, 81, 259, 198, 198, 39, 72, 260,
             258, 64, 82, 82, 72, 82, 83, 64, 77, 83, 259, 198, 198]
    assert batch.inputs["input_ids"][0].tolist() == left + [260] * 8 + right
    row = batch.rows[0]
    assert row.audio == (10, 18)
    assert row.extra["transcription"] == (19, 22)  # " ok" (its space, o, k)
    assert row.text == (31, 33)
    assert row.audio_frames == 50 and row.encoder_frames == {"speech_perception.whisper": 50}  # 1 s of a 2 s window


def test_transcription_comes_from_the_whisper_inside_the_model(desta2):
    proc = desta2.processor
    feats = proc.features(clips())
    whisper = desta2.model.speech_perception.whisper
    ids = whisper.generate(input_features=feats, max_new_tokens=4)
    assert proc.transcribe(desta2.model, feats, max_new_tokens=4) == \
        proc.whisper_processor.batch_decode(ids, skip_special_tokens=True)


def test_connector_reads_the_release_layers_and_fills_exactly_the_audio_span(desta2):
    """encoder_hidden_states[i] is the input of encoder layer i (index 2 = the final, layer-normed state for the
    2-layer tiny encoder); the LM sees the connector output on the span and token embeddings elsewhere."""
    model, proc = desta2.model, desta2.processor
    msgs = [proc.messages("What is it?", audio=True), proc.messages("Describe.", audio=True)]
    batch = proc(msgs, clips(), [" a", " bb"])
    encoder = model.speech_perception.whisper.get_encoder()
    states = encoder(batch.inputs["input_features"], output_hidden_states=True).hidden_states
    assert len(states) == 3 and torch.allclose(states[2], encoder(batch.inputs["input_features"]).last_hidden_state)
    seen = {}
    hook = model.llama.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]),
                                                 with_kwargs=True)
    with torch.no_grad():
        model(**batch.inputs)
        audio = model.speech_perception.connector(states)
        tokens = model.get_input_embeddings()(batch.inputs["input_ids"])
    hook.remove()
    for b, row in enumerate(batch.rows):
        span = torch.zeros(tokens.shape[1], dtype=torch.bool)
        span[row.offset + row.audio[0]: row.offset + row.audio[1]] = True
        assert torch.equal(seen["e"][b, span], audio[b])
        assert torch.equal(seen["e"][b, ~span], tokens[b, ~span])


def test_tiny_round_trip_gives_bit_identical_logits(desta2):
    proc = desta2.processor
    batch = proc([proc.messages("Hi", audio=True)], [clips()[0]], [" x"])
    built, loaded = desta2.built.state_dict(), desta2.model.state_dict()
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)
    with torch.no_grad():
        assert torch.equal(desta2.built(**batch.inputs).logits, desta2.model(**batch.inputs).logits)


def test_greedy_generate_with_cache_equals_a_hand_run_forward_loop(desta2):
    model, proc = desta2.model, desta2.processor
    batch = proc([proc.messages("Hi", audio=True), proc.messages("Go", audio=False)], [clips()[1], None],
                 [" y", None])
    out = model.generate(**batch.inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    inputs = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=ids, attention_mask=mask, **inputs).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


def test_padded_batch_gives_each_item_its_own_logits(desta2):
    proc, model = desta2.processor, desta2.model
    msgs = [proc.messages("What is this?", audio=True), proc.messages("Describe it.", audio=True),
            proc.messages("Say hello.", audio=False)]
    audios, trans = [*clips(), None], [" one", " two words", None]
    batch = proc(msgs, audios, trans)
    with torch.no_grad():
        together = model(**batch.inputs).logits
        for i, row in enumerate(batch.rows):
            alone = model(**proc([msgs[i]], [audios[i]], [trans[i]]).inputs).logits[0]
            torch.testing.assert_close(together[i, row.offset:], alone, atol=1e-5, rtol=1e-5)


def test_unavailable_parts_are_one_sentence_errors(desta2, tmp_path):
    with pytest.raises(UserError, match="config.json' is missing"):
        load_desta2(tmp_path)
    with pytest.raises(UserError, match="could not load a base model"):
        load_desta2(desta2.paths["desta2"], whisper_model=str(desta2.paths["whisper"]))  # llama id is offline
    (tmp_path / "config.json").write_text('{"model_type": "DestaModel"}')
    with pytest.raises(UserError, match="qformer_connector.pth' is missing"):
        load_desta2(tmp_path)


def test_an_assistant_prefix_continues_the_generation_prompt(desta2):
    """AudioLens prompts (seed 003, Table I) start the answer: ``<ASST>The speaker's gender is``; the prefix follows
    the template's generation prompt and is the last thing the LM reads."""
    proc = desta2.processor
    msgs = [proc.messages("What is the gender of the speaker?", audio=True)]
    batch = proc(msgs, [clips()[0]], [" hi"], assistant_prefixes=["The speaker's gender is"])
    text = proc.tokenizer.decode(batch.inputs["input_ids"][0])
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nThe speaker's gender is")
