"""Qwen-Audio-Chat v1 written here: released parameter names, the released prompt, reference numbers, round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SR, tone
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.arch.qwen_audio import QWenConfig, QWenLMHeadModel, ntk_alpha
from lalm_probe.plugins.models.arch.qwen_audio_encoder import audio_token_count, log_mel_spectrogram, pad_or_trim
from lalm_probe.plugins.models.arch.qwen_audio_load import build_tiny_qwen_audio_chat, load_qwen_audio_chat
from lalm_probe.plugins.models.arch.qwen_audio_processor import list_format_query
from lalm_probe.plugins.models.arch.qwen_audio_tokenizer import special_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen_audio_chat(tmp_path_factory.mktemp("qwen-audio-chat"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_qwen_audio_chat(tiny_dir)


def released_keys() -> set[str]:
    """``state_dict()`` keys of the released ``QWenLMHeadModel`` (32 blocks, audio encoder with 32 blocks), written
    from the module names of ``modeling_qwen.py`` and ``audio.py``: ``no_bias`` drops the MLP and ``c_proj``
    biases, the audio ``key`` projection has no bias, ``positional_embedding`` is a persistent buffer and
    ``avg_pooler`` has no parameters."""
    keys = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(32):
        keys |= {f"transformer.h.{i}.{name}" for name in (
            "ln_1.weight", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "ln_2.weight",
            "mlp.w1.weight", "mlp.w2.weight", "mlp.c_proj.weight")}
    audio = {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "positional_embedding",
             "ln_post.weight", "ln_post.bias", "proj.weight", "proj.bias", "audio_bos_eos_token.weight"}
    for i in range(32):
        audio |= {f"blocks.{i}.{name}" for name in (
            "attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.value.weight", "attn.value.bias",
            "attn.out.weight", "attn.out.bias", "attn_ln.weight", "attn_ln.bias", "mlp.0.weight", "mlp.0.bias",
            "mlp.2.weight", "mlp.2.bias", "mlp_ln.weight", "mlp_ln.bias")}
    return keys | {f"transformer.audio.{k}" for k in audio}


# config.json of the release (QwenLM/Qwen-Audio; Qwen/Qwen-Audio-Chat ships the same architecture fields)
RELEASED_CONFIG = dict(
    architectures=["QWenLMHeadModel"], attn_dropout_prob=0.0, bf16=False, fp16=False, fp32=False, emb_dropout_prob=0.0,
    intermediate_size=22016, initializer_range=0.02, kv_channels=128, layer_norm_epsilon=1e-05, model_type="qwen",
    hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, max_position_embeddings=8192, no_bias=True,
    onnx_safe=None, rotary_emb_base=10000, rotary_pct=1.0, scale_attn_weights=True, seq_length=2048,
    tie_word_embeddings=False, tokenizer_type="QWenTokenizer", use_cache=True, vocab_size=155947, use_dynamic_ntk=True,
    use_logn_attn=True, audio=dict(n_mels=80, n_ctx=1500, n_state=1280, n_head=20, n_layer=32, output_dim=4096,
                                   avg_pool=True, add_audio_bos_eos_token=True, audio_start_id=155163))


def test_real_size_state_dict_keys_and_shapes_are_the_released_checkpoints():
    with torch.device("meta"):
        model = QWenLMHeadModel(QWenConfig(**RELEASED_CONFIG))
    assert QWenConfig().to_dict()["audio"] == RELEASED_CONFIG["audio"]  # our defaults are the release's
    state = model.state_dict()
    assert set(state) == released_keys()
    shapes = {"transformer.wte.weight": (155947, 4096), "transformer.h.0.attn.c_attn.weight": (12288, 4096),
              "transformer.h.0.mlp.w1.weight": (11008, 4096), "transformer.h.0.mlp.c_proj.weight": (4096, 11008),
              "transformer.audio.conv1.weight": (1280, 80, 3), "transformer.audio.positional_embedding": (1500, 1280),
              "transformer.audio.proj.weight": (4096, 1280), "transformer.audio.audio_bos_eos_token.weight": (2, 4096),
              "lm_head.weight": (155947, 4096)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def test_special_tokens_put_audio_tags_where_the_released_config_says():
    # 151643 BPE ranks in the released qwen.tiktoken; config.json: audio_start_id 155163 (</audio> is the next id)
    names = special_tokens()
    assert 151643 + names.index("<audio>") == 155163 and 151643 + names.index("</audio>") == 155164
    assert 151643 + names.index("[[[AUDIO:modality]]]") == 151851 and len(names) == 3522


def test_audio_span_length_follows_process_audio():
    # mel_len = L // 160; T_cnn = (mel_len - 1) // 2 + 1; tokens = (T_cnn - 2) // 2 + 1; clips cut at 30 s
    assert audio_token_count(16000) == (50, 25)
    assert audio_token_count(8000) == (25, 12)
    assert audio_token_count(16000 * 45) == (1500, 750)


# Tiny tokenizer pieces, followed by hand through tiktoken's BPE on tiny_ranks() (ids of merges in comments).
IM_START, IM_END, NL, PAD, AUDIO, END_AUDIO = 292, 293, [10], 499, 3811, 3812
SYSTEM = [115, 121, 115, 116, 101, 109]                                   # s y s t e m
USER = [117, 115, 259]                                                    # u s er
ASSISTANT = [97, 115, 115, 261, 116, 290]                                 # a s s is t ant
HELPFUL = [89, 262, 270, 266, 270, 32, 257, 108, 112, 102, 117, 108, 270, 115, 115, 261, 116, 290, 46]
AUDIO_1 = [65, 117, 100, 105, 111, 32, 49, 58]                           # A u d i o ' ' 1 :
QUESTION = [281, 277, 275, 289, 63]                                       # What ' is' ' the' ' gender' ?
PREFIX = [84, 257, 271, 112, 283, 259, 39, 115, 289, 277]                # T he ' s' p eak er ' s ' gender' ' is'


def expected_context(content: list[int], history: list[int] = ()) -> list[int]:
    """``make_context``: system turn, history, then ``\\n<|im_start|>user\\n{query}<|im_end|>\\n``
    ``<|im_start|>assistant\\n``."""
    return ([IM_START] + SYSTEM + NL + HELPFUL + [IM_END] + list(history) + NL + [IM_START] + USER + NL + content
            + [IM_END] + NL + [IM_START] + ASSISTANT + NL)


def test_prompt_with_audio_is_make_context_token_for_token(tiny):
    _, processor = tiny
    batch = processor([list_format_query(1, "What is the gender?")], [[tone(200, 0.5)]])
    # 0.5 s -> 12 audio tokens -> span 14: <audio> + 12 placeholders + </audio>
    content = AUDIO_1 + [AUDIO] + [PAD] * 12 + [END_AUDIO] + NL + QUESTION
    assert batch.inputs["input_ids"][0].tolist() == expected_context(content)
    assert batch.raw_texts[0] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                  "Audio 1:<audio>audio1.wav</audio>\nWhat is the gender?<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert batch.inputs["input_audio_lengths"].tolist() == [[25, 12]]


def test_history_and_assistant_prefix_follow_the_chat_format(tiny):
    _, processor = tiny
    batch = processor(["What is the gender?"], histories=[[("What is the gender?", "The speaker's gender is")]],
                      assistant_prefixes=["The speaker's gender is"])
    history = (NL + [IM_START] + USER + NL + QUESTION + [IM_END] + NL + [IM_START] + ASSISTANT + NL + PREFIX
               + [IM_END])
    assert batch.inputs["input_ids"][0].tolist() == expected_context(QUESTION, history) + PREFIX


def test_history_audio_reaches_the_prompt_unless_the_window_drops_its_turn(tiny):
    model, processor = tiny
    first, now = list_format_query(1, "What is the gender?"), list_format_query(1, "What is the gender?")
    batch = processor([now], [[tone(200, 0.5), tone(300, 1.0)]], histories=[[(first, "The speaker's gender is")]])
    assert [e - s for s, e in batch.rows[0].audio_spans] == [14, 27] and batch.rows[0].clips == [0, 1]
    with torch.no_grad():
        assert model(**batch.inputs).logits.shape[1] == batch.inputs["input_ids"].shape[1]
    # make_context keeps a history turn only while system + turns stay under max_window_size
    ctx = processor.make_context(now, [14, 27], history=[(first, "The speaker's gender is")], max_window_size=60)
    assert ctx.clips == [1] and ctx.ids.count(AUDIO) == 1 and ctx.raw_text.count("<audio>") == 1


def test_row_layout_points_at_the_audio_placeholders_and_the_text(tiny):
    _, processor = tiny
    batch = processor([list_format_query(1, "What is the gender?"), "What is the gender?"], [[tone(200, 1.0)], []])
    ids, rows = batch.inputs["input_ids"], batch.rows
    first = rows[0]
    valid = ids[0, first.offset:].tolist()
    (start, end), = first.audio_spans
    assert valid[start] == AUDIO and valid[end - 1] == END_AUDIO and valid[start + 1:end - 1] == [PAD] * 25
    assert valid[slice(*first.text_span)] == QUESTION and first.clips == [0] and first.clip_frames == [50]
    second = rows[1]
    assert second.offset == ids.shape[1] - second.length and second.audio_spans == []
    assert ids[1, second.offset:].tolist()[slice(*second.text_span)] == QUESTION


def test_log_mel_matches_transformers_whisper_features():
    from transformers import WhisperFeatureExtractor

    clip = tone(300, 1.3) + 0.01 * np.random.default_rng(0).standard_normal(int(1.3 * SR)).astype(np.float32)
    from lalm_probe.plugins.models.arch.qwen_audio_encoder import librosa_mel_filters

    ours = log_mel_spectrogram(pad_or_trim(clip), librosa_mel_filters(80)).numpy()
    theirs = WhisperFeatureExtractor(feature_size=80)(clip, sampling_rate=SR, return_tensors="np").input_features[0]
    assert ours.shape == theirs.shape == (80, 3000)
    assert np.abs(ours - theirs).max() < 1e-3


def release_audio_forward(enc, mel: torch.Tensor, t_cnn: int) -> torch.Tensor:
    """``AudioEncoder.forward`` of ``audio.py`` for one clip, written out with the release's own attention math."""
    x = mel[None, :, : 2 * t_cnn]
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(x)))).permute(0, 2, 1)
    x = x + enc.positional_embedding[: x.shape[1]]
    for blk in enc.blocks:
        h = blk.attn_ln(x)
        n, heads = x.shape[1], blk.attn.n_head
        scale = (x.shape[2] // heads) ** -0.25
        q = blk.attn.query(h).view(1, n, heads, -1).permute(0, 2, 1, 3) * scale
        k = blk.attn.key(h).view(1, n, heads, -1).permute(0, 2, 3, 1) * scale
        v = blk.attn.value(h).view(1, n, heads, -1).permute(0, 2, 1, 3)
        w = torch.softmax(q @ k, dim=-1)
        x = x + blk.attn.out((w @ v).permute(0, 2, 1, 3).flatten(start_dim=2))
        x = x + blk.mlp(blk.mlp_ln(x))
    x = enc.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
    return enc.proj(enc.ln_post(x))[0]


def test_audio_encoder_equals_the_release_formula_alone_and_in_a_batch(tiny):
    model, processor = tiny
    clips = [tone(180, 1.0), tone(260, 0.55)]
    mels, lengths, _ = processor.audio_features(clips)
    with torch.no_grad():
        batched = model.transformer.audio(mels, lengths)
        for i in range(2):
            t_cnn, n_tok = lengths[i].tolist()
            ref = release_audio_forward(model.transformer.audio, mels[i], t_cnn)[:n_tok]
            torch.testing.assert_close(batched[i, :n_tok], ref, atol=1e-5, rtol=1e-5)


def test_text_only_logits_equal_transformers_qwen2_with_the_same_weights(tiny):
    """QWen v1 is Qwen2 up to names: c_attn = [q; k; v], w2 is the gate (silu), w1 the up projection."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, processor = tiny
    cfg = model.config
    ref = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size // 2,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=cfg.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)).eval()
    src = model.state_dict()
    sd = {"model.embed_tokens.weight": src["transformer.wte.weight"], "lm_head.weight": src["lm_head.weight"],
          "model.norm.weight": src["transformer.ln_f.weight"]}
    for i in range(cfg.num_hidden_layers):
        h, m = f"transformer.h.{i}.", f"model.layers.{i}."
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), src[h + "attn.c_attn.weight"].chunk(3),
                              src[h + "attn.c_attn.bias"].chunk(3)):
            sd[m + f"self_attn.{name}.weight"], sd[m + f"self_attn.{name}.bias"] = w, b
        sd |= {m + "self_attn.o_proj.weight": src[h + "attn.c_proj.weight"],
               m + "mlp.gate_proj.weight": src[h + "mlp.w2.weight"], m + "mlp.up_proj.weight": src[h + "mlp.w1.weight"],
               m + "mlp.down_proj.weight": src[h + "mlp.c_proj.weight"],
               m + "input_layernorm.weight": src[h + "ln_1.weight"],
               m + "post_attention_layernorm.weight": src[h + "ln_2.weight"]}
    ref.load_state_dict(sd)
    ids = processor(["What is the gender?"]).inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_encoder_output_lands_exactly_on_the_audio_span(tiny):
    model, processor = tiny
    batch = processor([list_format_query(1, "What is the gender?")], [[tone(200, 0.7)]])
    seen = {}
    hook = model.transformer.h[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(**batch.inputs)
        hook.remove()
        (start, end), = batch.rows[0].audio_spans
        feats = model.transformer.audio(batch.inputs["input_audios"], batch.inputs["input_audio_lengths"])
        span = model.transformer.audio.span_embeddings(feats, batch.inputs["input_audio_lengths"])[0]
        embeds = model.transformer.wte(batch.inputs["input_ids"])
    h = seen["h"][0]
    torch.testing.assert_close(h[start:end], span)
    outside = torch.ones(h.shape[0], dtype=torch.bool)
    outside[start:end] = False
    assert torch.equal(h[outside], embeds[0][outside])


def test_release_style_audio_info_gives_the_same_logits(tiny):
    model, processor = tiny
    batch = processor([list_format_query(1, "What is the gender?")], [[tone(200, 0.6)]])
    info = {"input_audios": batch.inputs["input_audios"], "input_audio_lengths": batch.inputs["input_audio_lengths"],
            "audio_span_tokens": [14]}
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits,
                           model(input_ids=batch.inputs["input_ids"], audio_info=info).logits)


def test_a_checkpoint_without_the_sinusoid_table_gets_it_recomputed(tiny_dir, tmp_path):
    import json
    import shutil

    from lalm_probe.plugins.models.arch.qwen_audio_encoder import sinusoids
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_dir, tmp_path, dirs_exist_ok=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("transformer.audio.positional_embedding")
    tensors = load_file(tmp_path / shard)
    del tensors["transformer.audio.positional_embedding"]
    save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model, _ = load_qwen_audio_chat(tmp_path)
    assert torch.equal(model.transformer.audio.positional_embedding, sinusoids(1500, 64))


def test_greedy_generate_equals_a_hand_run_forward_loop(tiny):
    model, processor = tiny
    batch = processor([list_format_query(1, "What is the gender?")], [[tone(200, 0.6)]])
    with torch.no_grad():
        out = model.generate(**batch.inputs, max_new_tokens=5, min_new_tokens=5)
        ids = batch.inputs["input_ids"]
        for _ in range(5):  # full forward over the whole sequence each step: no cache
            logits = model(input_ids=ids, input_audios=batch.inputs["input_audios"],
                           input_audio_lengths=batch.inputs["input_audio_lengths"], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_padded_batch_gives_each_item_what_it_gives_alone(tiny):
    model, processor = tiny
    queries = [list_format_query(1, "What is the gender?"), "What is the gender? " * 3,
               list_format_query(2, "Compare.")]
    audios = [[tone(200, 1.2)], [], [tone(150, 0.4), tone(300, 0.9)]]
    batch = processor(queries, audios)
    with torch.no_grad():
        logits = model(**batch.inputs).logits
        gen = model.generate(**batch.inputs, max_new_tokens=4, min_new_tokens=4)[:, -4:]
        for b, row in enumerate(batch.rows):
            alone = processor([queries[b]], [audios[b]])
            ref = model(**alone.inputs).logits[0]
            torch.testing.assert_close(logits[b, row.offset:], ref, atol=2e-5, rtol=1e-4)
            single = model.generate(**alone.inputs, max_new_tokens=4, min_new_tokens=4)
            assert gen[b].tolist() == single[0, -4:].tolist()


def test_save_and_load_round_trip_is_bit_identical(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    processor.save_pretrained(tmp_path)
    again, proc2 = load_qwen_audio_chat(tmp_path)
    batch = processor([list_format_query(1, "What is the gender?")], [[tone(200, 0.5)]])
    assert proc2([list_format_query(1, "What is the gender?")], [[tone(200, 0.5)]]).inputs["input_ids"].equal(
        batch.inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, again(**batch.inputs).logits)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_tiny_build_is_seeded(tiny, tmp_path):
    model, _ = tiny
    rebuilt, _ = load_qwen_audio_chat(build_tiny_qwen_audio_chat(tmp_path))
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in model.state_dict().items())


def test_dynamic_ntk_alpha_follows_the_release():
    # get_ntk_alpha: 2 ** ceil(log2(len / 2048) + 1) - 1, at least 1
    lengths = torch.tensor([10, 2048, 2049, 4096, 4097, 9000])
    assert ntk_alpha(lengths, 2048).tolist() == [1, 1, 3, 3, 7, 15]


def test_missing_checkpoints_are_one_sentence_errors(tmp_path):
    with pytest.raises(UserError, match="qwen.tiktoken"):
        load_qwen_audio_chat(tmp_path)
    with pytest.raises(UserError, match="hf download Qwen/Qwen-Audio-Chat"):
        load_qwen_audio_chat("Qwen/Qwen-Audio-Chat")
    with pytest.raises(UserError, match="not a directory"):
        load_qwen_audio_chat(tmp_path / "absent")


def test_nnsight_reads_layers_per_decode_step(tiny):
    from nnsight import NNsight

    model, processor = tiny
    batch = processor([list_format_query(1, "What is the gender?")], [[tone(200, 0.5)]])
    nm, steps = NNsight(model), []
    with torch.no_grad(), nm.trace(**batch.inputs, fn=model.generate, max_new_tokens=3, min_new_tokens=3) as tracer:
        for step in tracer.iter[0:3]:
            if step == 0:
                enc = nm.transformer.audio.blocks[1].output.save()
            steps.append(nm.transformer.h[1].output.save())
    width = batch.inputs["input_ids"].shape[1]
    assert [tuple(s.shape) for s in steps] == [(1, width, 64), (1, 1, 64), (1, 1, 64)]
    assert tuple(enc.shape) == (1, 25, 64)
