"""SALMONN on transformers parts: release key names, the release prompt wrapping, round trip, generation, padding."""

from __future__ import annotations

import pytest
import torch
from arch_helpers import checkpoint_keys, clips, llama_keys, whisper_encoder_keys
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.arch.salmonn import SalmonnConfig, SalmonnModel
from lalm_probe.plugins.models.arch.salmonn_io import load_salmonn

WHISPER_LARGE_V2 = dict(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                        decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=80,
                        vocab_size=51865, max_source_positions=1500)
VICUNA_13B = dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, vocab_size=32001, tie_word_embeddings=False)
# ``cfg`` of BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt as far as it decides names (values from the BEATs
# README's model; ``max_distance`` and dropouts do not change keys)
BEATS_CPT2 = dict(input_patch_size=16, embed_dim=512, conv_bias=False, encoder_layers=12, encoder_embed_dim=768,
                  encoder_ffn_embed_dim=3072, encoder_attention_heads=12, activation_fn="gelu",
                  layer_norm_first=False, deep_norm=True, conv_pos=128, conv_pos_groups=16,
                  relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
                  finetuned_model=True, predictor_class=527)


def beats_keys(prefix: str, layers: int) -> set[str]:
    """``BEATs.state_dict()`` (``models/beats/BEATs.py``, ``backbone.py``): the shared relative-position table is
    stored under every layer, the positional convolution as weight-norm ``weight_g``/``weight_v``."""
    keys = {prefix + n for n in ("patch_embedding.weight", "layer_norm.weight", "layer_norm.bias",
                                 "post_extract_proj.weight", "post_extract_proj.bias", "encoder.pos_conv.0.weight_g",
                                 "encoder.pos_conv.0.weight_v", "encoder.pos_conv.0.bias", "encoder.layer_norm.weight",
                                 "encoder.layer_norm.bias", "predictor.weight", "predictor.bias")}
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        keys |= {f"{p}self_attn.{w}.{t}" for w in ("k_proj", "v_proj", "q_proj", "out_proj", "grep_linear")
                 for t in ("weight", "bias")}
        keys |= {p + n for n in ("self_attn.grep_a", "self_attn.relative_attention_bias.weight",
                                 "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.weight", "fc1.bias",
                                 "fc2.weight", "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias")}
    return keys


def qformer_keys(prefix: str, layers: int) -> set[str]:
    """``speech_Qformer`` after ``init_speech_Qformer`` deletes word/position embeddings, ``intermediate``/``output``
    and ``cls``: the embedding LayerNorm and its ``position_ids`` buffer, then per layer self/cross attention and
    the query feed-forward."""
    keys = {f"{prefix}bert.embeddings.position_ids", f"{prefix}bert.embeddings.LayerNorm.weight",
            f"{prefix}bert.embeddings.LayerNorm.bias"}
    for i in range(layers):
        p = f"{prefix}bert.encoder.layer.{i}."
        for att in ("attention", "crossattention"):
            keys |= {f"{p}{att}.self.{w}.{t}" for w in ("query", "key", "value") for t in ("weight", "bias")}
            keys |= {f"{p}{att}.output.{w}.{t}" for w in ("dense", "LayerNorm") for t in ("weight", "bias")}
        keys |= {f"{p}intermediate_query.dense.{t}" for t in ("weight", "bias")}
        keys |= {f"{p}output_query.{w}.{t}" for w in ("dense", "LayerNorm") for t in ("weight", "bias")}
    return keys


def test_real_size_keys_are_the_released_names():
    """Keys of the release's ``SALMONN`` module (13B v1: whisper-large-v2, BEATs cpt2, Vicuna 13B + [PAD] with peft
    0.3 LoRA on q/v), minus the per-layer ``rotary_emb.inv_freq`` buffers transformers 4.28 persisted (transformers 5
    keeps one, unsaved, rotary table; the loader accepts and ignores them)."""
    config = SalmonnConfig(whisper_config=WHISPER_LARGE_V2, llama_config=VICUNA_13B, beats_config=BEATS_CPT2)
    with torch.device("meta"):
        model = SalmonnModel(config)
    expected = (whisper_encoder_keys("speech_encoder.", 32) | {"ln_speech.weight", "ln_speech.bias"}
                | beats_keys("beats.", 12) | {"ln_audio.weight", "ln_audio.bias"} | qformer_keys("speech_Qformer.", 2)
                | {"speech_query_tokens", "speech_llama_proj.weight", "speech_llama_proj.bias"}
                | llama_keys("llama_model.base_model.model.", 40, lora=("q_proj", "v_proj")))
    assert checkpoint_keys(model) == expected
    cross = model.speech_Qformer.bert.encoder.layer[0].crossattention.self
    assert tuple(cross.key.weight.shape) == (768, 1280 + 768)  # encoder_width = Whisper + BEATs
    assert tuple(model.get_input_embeddings().weight.shape) == (32001, 5120)
    assert config.window() == (17, 17) and config.num_windows(1500) == 88  # 0.33 s windows of a 30 s input


def test_prompt_is_token_for_token_the_release_prompt_wrap(salmonn):
    """``cli_inference.py`` wraps the prompt as ``USER: <Speech><SpeechHere></Speech> Hi\\nASSISTANT:``;
    ``prompt_wrap`` splits at ``<SpeechHere>`` and tokenizes both halves without special tokens; ``generate`` puts
    BOS first; the speech span holds one embedding per window (5 for the 2 s tiny window). Tiny tokenizer: ASCII
    c -> ord(c) - 33, space 220, newline 198; 257 ``<s>``, 259 ``[PAD]`` (the filler)."""
    proc = salmonn.processor
    text = proc.render(" Hi ", audio=True)
    assert text == "USER: <Speech><SpeechHere></Speech> Hi\nASSISTANT:"
    batch = proc([text], [clips()[0]], user_texts=["Hi"])
    before = [52, 50, 36, 49, 25, 220, 27, 50, 79, 68, 68, 66, 71, 29]
    after = [27, 14, 50, 79, 68, 68, 66, 71, 29, 220, 39, 72, 198, 32, 50, 50, 40, 50, 51, 32, 45, 51, 25]
    assert batch.inputs["input_ids"][0].tolist() == [257] + before + [259] * 5 + after
    assert (batch.rows[0].audio, batch.rows[0].text) == ((15, 20), (30, 32))
    # 1 s: 100 mel frames -> 50 Whisper frames; 98 fbank frames -> 6 time x 8 frequency BEATs patches
    assert batch.rows[0].encoder_frames == {"speech_encoder": 50, "beats": 48}


def test_audio_is_padded_to_one_second_and_cut_to_the_window(salmonn):
    proc = salmonn.processor
    batch = proc([proc.render("x", audio=True)] * 2, [clips()[1], torch.ones(48000).numpy()])
    assert batch.inputs["raw_wav_lens"].tolist() == [16000, 32000]  # 0.4 s -> 1 s; 3 s -> the 2 s window


def test_speech_span_holds_the_window_embeddings(salmonn):
    model, proc = salmonn.model, salmonn.processor
    batch = proc([proc.render("What?", audio=True), proc.render("Why?", audio=True)], clips())
    seen = {}
    hook = model.lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch.inputs)
        speech = model.encode_speech(batch.inputs["input_features"], batch.inputs["raw_wav"],
                                     batch.inputs["raw_wav_lens"])
        tokens = model.get_input_embeddings()(batch.inputs["input_ids"])
    hook.remove()
    assert speech.shape[:2] == (2, 5)
    for b, row in enumerate(batch.rows):
        span = torch.zeros(tokens.shape[1], dtype=torch.bool)
        span[row.offset + row.audio[0]: row.offset + row.audio[1]] = True
        assert torch.equal(seen["e"][b, span], speech[b])
        assert torch.equal(seen["e"][b, ~span], tokens[b, ~span])


def test_lora_is_live_in_the_loaded_model(salmonn):
    """The loaded adapters change the LM's output by exactly B(A(x)) * alpha / r on the wrapped projections."""
    q = salmonn.model.lm.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 32.0 / 8 and q.lora_B["default"].weight.abs().sum() > 0
    x = torch.randn(3, q.in_features)
    base = torch.nn.functional.linear(x, q.weight, q.bias)
    lora = x @ q.lora_A["default"].weight.T @ q.lora_B["default"].weight.T * 4.0
    torch.testing.assert_close(q(x), base + lora)


def test_tiny_round_trip_gives_bit_identical_logits(salmonn):
    proc = salmonn.processor
    batch = proc([proc.render("Hi", audio=True)], [clips()[0]])
    built, loaded = salmonn.built.state_dict(), salmonn.model.state_dict()
    assert built.keys() == loaded.keys() and all(torch.equal(built[k], loaded[k]) for k in built)
    with torch.no_grad():
        assert torch.equal(salmonn.built(**batch.inputs).logits, salmonn.model(**batch.inputs).logits)


def test_greedy_generate_with_cache_equals_a_hand_run_forward_loop(salmonn):
    model, proc = salmonn.model, salmonn.processor
    batch = proc([proc.render("Hi", audio=True), proc.render("Go", audio=False)], [clips()[1], None])
    out = model.generate(**batch.inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    inputs = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=ids, attention_mask=mask, **inputs).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


def test_padded_batch_gives_each_item_its_own_logits(salmonn):
    """Clips of different lengths: Whisper sees the padded window either way; BEATs runs per clip length."""
    proc, model = salmonn.processor, salmonn.model
    texts = [proc.render("What is this?", audio=True), proc.render("Describe it.", audio=True),
             proc.render("Say hello.", audio=False)]
    audios = [*clips(), None]
    batch = proc(texts, audios)
    with torch.no_grad():
        together = model(**batch.inputs).logits
        for i, row in enumerate(batch.rows):
            alone = model(**proc([texts[i]], [audios[i]]).inputs).logits[0]
            torch.testing.assert_close(together[i, row.offset:], alone, atol=1e-5, rtol=1e-5)


def test_unavailable_parts_are_one_sentence_errors(salmonn, tmp_path):
    p = salmonn.paths
    with pytest.raises(UserError, match="uses BEATs"):
        load_salmonn(str(p["salmonn"]), whisper=str(p["whisper"]), llama=str(p["vicuna"]))
    with pytest.raises(UserError, match="hf download openai/whisper-large-v2"):
        load_salmonn(str(p["salmonn"]), beats=str(p["beats"]), llama=str(p["vicuna"]))
    with pytest.raises(UserError, match="neither a checkpoint file nor a known release"):
        load_salmonn("someone/else")
    with pytest.raises(UserError, match="hf download tsinghua-ee/SALMONN"):
        load_salmonn("tsinghua-ee/SALMONN")
    bad = tmp_path / "bad.pth"
    state = torch.load(p["salmonn"], weights_only=True)
    state["model"]["speech_Qformer.surprise"] = torch.zeros(1)
    torch.save(state, bad)
    with pytest.raises(UserError, match="does not know"):
        load_salmonn(str(bad), whisper=str(p["whisper"]), beats=str(p["beats"]), llama=str(p["vicuna"]))
