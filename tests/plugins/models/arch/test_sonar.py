"""SONAR written here: fairseq2 key names, NLLB tokenisation, fbank, reference encoders, both poolings, round trip."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SR, tone
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models.arch.sonar_checkpoint import read_state_dict
from lalm_probe.plugins.models.arch.sonar_speech import (
    SonarSpeechConfig,
    SonarSpeechEncoder,
    build_tiny_sonar_speech,
    load_sonar_speech,
)
from lalm_probe.plugins.models.arch.sonar_text import (
    SonarTextConfig,
    SonarTextEncoder,
    build_tiny_sonar_text,
    load_sonar_text,
)
from lalm_probe.plugins.models.arch.sonar_tokenizer import NLLB_LANGS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return build_tiny_sonar_text(tmp_path_factory.mktemp("sonar-text"))


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    return build_tiny_sonar_speech(tmp_path_factory.mktemp("sonar-speech"))


@pytest.fixture(scope="module")
def text(text_dir):
    return load_sonar_text(text_dir)


@pytest.fixture(scope="module")
def speech(speech_dir):
    return load_sonar_speech(speech_dir)


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return tone(170 + 40 * seed, seconds) + 0.05 * rng.standard_normal(int(seconds * SR)).astype(np.float32)


# ---- key lists, written from fairseq2 0.4's module names as SONAR's factories assemble them ----------------------
LINEAR = ("weight", "bias")
NORM = ("weight", "bias")


def attn_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{p}_proj.{w}" for p in ("q", "k", "v", "output") for w in LINEAR}


def released_text_keys(layers: int = 24) -> set[str]:
    """``SonarTextTransformerEncoderModel`` (arch ``basic``): frontend embedding (sinusoids are a non-persistent
    buffer), pre-norm layers without an inner FFN norm, no encoder-level norm (POST stack), model ``layer_norm``."""
    keys = {"encoder_frontend.embed.weight", "layer_norm.weight", "layer_norm.bias"}
    for i in range(layers):
        p = f"encoder.layers.{i}"
        keys |= attn_keys(f"{p}.self_attn") | {f"{p}.{n}.{w}" for n in ("self_attn_layer_norm", "ffn_layer_norm")
                                              for w in NORM}
        keys |= {f"{p}.ffn.{n}.{w}" for n in ("inner_proj", "output_proj") for w in LINEAR}
    return keys


def released_speech_keys(pooler_layers: int, layers: int = 24) -> set[str]:
    """``SonarSpeechEncoderModel``: w2v-BERT frontend (no position encoder, no frontend ``layer_norm``), Conformer
    blocks (relative SDPA ``u_bias``/``v_bias``/``r_proj``, batch-norm convolution without biases), the moved
    ``layer_norm``, and the attention pooler (one-token embedding, post-norm decoder, ``projection_out`` no bias)."""
    keys = {f"encoder_frontend.{n}.{w}" for n in ("post_extract_layer_norm", "model_dim_proj") for w in LINEAR}
    keys |= {"layer_norm.weight", "layer_norm.bias", "encoder_pooler.decoder_frontend.embed.weight",
             "encoder_pooler.projection_out.weight"}
    for i in range(layers):
        p = f"encoder.layers.{i}"
        keys |= {f"{p}.{n}.{w}" for n in ("ffn1_layer_norm", "self_attn_layer_norm", "conv_layer_norm",
                                          "ffn2_layer_norm", "layer_norm") for w in NORM}
        keys |= {f"{p}.{f}.{n}.{w}" for f in ("ffn1", "ffn2") for n in ("inner_proj", "output_proj") for w in LINEAR}
        keys |= attn_keys(f"{p}.self_attn") | {f"{p}.self_attn.sdpa.{n}" for n in ("u_bias", "v_bias",
                                                                                 "r_proj.weight")}
        keys |= {f"{p}.conv.{n}.weight" for n in ("pointwise_conv1", "depthwise_conv", "pointwise_conv2")}
        keys |= {f"{p}.conv.batch_norm.{n}" for n in ("weight", "bias", "running_mean", "running_var",
                                                      "num_batches_tracked")}
    for i in range(pooler_layers):
        p = f"encoder_pooler.decoder.layers.{i}"
        keys |= attn_keys(f"{p}.self_attn") | attn_keys(f"{p}.encoder_decoder_attn")
        keys |= {f"{p}.{n}.{w}" for n in ("self_attn_layer_norm", "encoder_decoder_attn_layer_norm", "ffn_layer_norm")
                 for w in NORM}
        keys |= {f"{p}.ffn.{n}.{w}" for n in ("inner_proj", "output_proj") for w in LINEAR}
    return keys


def test_real_size_text_encoder_keys_are_fairseq2s():
    with torch.device("meta"):
        state = SonarTextEncoder(SonarTextConfig()).state_dict()
    assert set(state) == released_text_keys()
    assert tuple(state["encoder_frontend.embed.weight"].shape) == (256206, 1024)
    assert tuple(state["encoder.layers.0.ffn.inner_proj.weight"].shape) == (8192, 1024)


@pytest.mark.parametrize("config,pooler_layers", [(SonarSpeechConfig.english(), 3), (SonarSpeechConfig(), 6)])
def test_real_size_speech_encoder_keys_are_fairseq2s(config, pooler_layers):
    with torch.device("meta"):
        state = SonarSpeechEncoder(config).state_dict()
    assert set(state) == released_speech_keys(pooler_layers)
    shapes = {"encoder_frontend.model_dim_proj.weight": (1024, 160), "encoder.layers.0.self_attn.sdpa.u_bias": (16, 64),
              "encoder.layers.0.conv.pointwise_conv1.weight": (2048, 1024, 1),
              "encoder.layers.0.conv.depthwise_conv.weight": (1024, 1, 31),
              "encoder_pooler.decoder_frontend.embed.weight": (1024, 1024)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


# ---- tokenisation -----------------------------------------------------------------------------------------------
def test_language_tokens_get_the_released_ids():
    # 256000 SentencePiece pieces shifted by the <pad> at 0; __lang__ pieces follow in card order:
    # NLLB's eng_Latn is 256047, and the vocabulary is the encoder's 256206 rows.
    assert len(NLLB_LANGS) == 202 and 256001 + NLLB_LANGS.index("eng_Latn") == 256047
    assert 256000 + 1 + len(NLLB_LANGS) + 3 == SonarTextConfig().vocab_size


def test_text_tokens_are_the_pipeline_s_token_for_token(text):
    _, processor = text
    # Tiny SentencePiece model: <unk> <s> </s>, '▁', a-z, A-Z, 0-9, .,?!'-, then '▁'+word; after fairseq2's
    # <pad> at 0 that is <unk> 1, <s> 2, </s> 3, '▁' 4, 'a' 5 .. 'z' 30, 'A' 31 .., '.' 67, '!' 70, '▁hello' 73,
    # '▁the' 75, '▁cat' 76, '▁sat' 77, '▁on' 78, '▁mat' 79, '▁le' 81, '▁chat' 82; the 88 pieces are followed
    # by __eng_Latn__ 88, __fra_Latn__ 89, __deu_Latn__ 90 and the three extra control symbols.
    batch = processor(["the cat sat on the mat.", "Bonjour le chat!"], ["eng_Latn", "fra_Latn"])
    assert batch.inputs["input_ids"].tolist() == [
        [88, 75, 76, 77, 78, 75, 79, 67, 3, 0, 0, 0, 0],  # __eng_Latn__ ▁the ▁cat ▁sat ▁on ▁the ▁mat . </s> <pad>
        [89, 4, 32, 19, 18, 14, 19, 25, 22, 81, 82, 70, 3]]  # __fra_Latn__ ▁ B o n j o u r ▁le ▁chat ! </s>
    assert batch.inputs["attention_mask"].sum(-1).tolist() == [9, 13]
    assert [(r.length, r.spans) for r in batch.rows] == [(9, {"text": (1, 8)}), (13, {"text": (1, 12)})]


def test_text_longer_than_max_seq_len_is_cut_as_the_pipeline_does(text):
    _, processor = text
    long = processor(["the " * 600], "eng_Latn")
    assert long.inputs["input_ids"].shape == (1, 514) and long.rows[0].spans == {"text": (1, 514)}


# ---- text encoder -----------------------------------------------------------------------------------------------
def test_text_encoder_equals_transformers_nllb_encoder_with_the_same_weights(text):
    """SONAR's text encoder is NLLB's (M2M100 in transformers): scaled embeddings, fairseq sinusoids from pad+1."""
    from transformers import M2M100Config
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100Encoder

    model, processor = text
    cfg = model.config
    ref = M2M100Encoder(M2M100Config(vocab_size=cfg.vocab_size, d_model=cfg.model_dim, encoder_layers=cfg.num_layers,
                                     encoder_attention_heads=cfg.num_heads, encoder_ffn_dim=cfg.ffn_inner_dim,
                                     activation_function="relu", pad_token_id=cfg.pad_idx, scale_embedding=True,
                                     max_position_embeddings=512)).eval()
    names = {"self_attn.output_proj": "self_attn.out_proj", "ffn.inner_proj": "fc1", "ffn.output_proj": "fc2",
             "ffn_layer_norm": "final_layer_norm"}
    state = {}
    for key, value in model.state_dict().items():
        new = key.replace("encoder_frontend.embed", "embed_tokens").replace("encoder.layers", "layers")
        for ours, theirs in names.items():
            new = new.replace(ours, theirs)
        state[new] = value
    ref.load_state_dict(state, strict=False)
    ids = processor(["the cat sat on the mat."], "eng_Latn").inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)


def test_text_pooling_is_the_mean_over_valid_tokens(text):
    model, processor = text
    batch = processor(["hello world", "the cat sat on the mat."], "eng_Latn")
    with torch.no_grad():
        out = model(**batch.inputs)
    for b, row in enumerate(batch.rows):
        hand = out.last_hidden_state[b, : row.length].sum(0) / row.length
        torch.testing.assert_close(out.sentence_embedding[b], hand, atol=1e-6, rtol=1e-5)


def test_padded_text_batch_gives_each_sentence_what_it_gives_alone(text):
    model, processor = text
    texts = ["hello world", "the cat sat on the mat.", "die katze"]
    batch = processor(texts, ["eng_Latn", "eng_Latn", "deu_Latn"])
    with torch.no_grad():
        out = model(**batch.inputs, output_hidden_states=True)
        for b, (t, lang) in enumerate(zip(texts, ["eng_Latn", "eng_Latn", "deu_Latn"])):
            alone = model(**processor([t], lang).inputs, output_hidden_states=True)
            n = batch.rows[b].length
            torch.testing.assert_close(out.sentence_embedding[b], alone.sentence_embedding[0], atol=1e-6, rtol=1e-5)
            for h, h1 in zip(out.hidden_states, alone.hidden_states):
                torch.testing.assert_close(h[b, :n], h1[0], atol=1e-6, rtol=1e-5)


# ---- speech front end -------------------------------------------------------------------------------------------
def kaldi_fbank_frame(wave: np.ndarray, frame: int) -> np.ndarray:
    """One frame of Kaldi's fbank as kaldi-native-fbank computes it with fairseq2's options, written out."""
    x = wave[frame * 160: frame * 160 + 400].astype(np.float64) * 2 ** 15
    x = x - x.mean()
    x = np.concatenate([[x[0] - 0.97 * x[0]], x[1:] - 0.97 * x[:-1]])
    x = x * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(x, 512)) ** 2

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    edges = np.linspace(mel(20.0), mel(8000.0), 82)
    freqs = mel(np.arange(257) * 16000 / 512)
    banks = np.zeros((80, 257))
    for m in range(80):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        up, down = (freqs - left) / (centre - left), (right - freqs) / (right - centre)
        banks[m] = np.clip(np.minimum(up, down), 0, None) * ((freqs > left) & (freqs < right))
    return np.log(np.maximum(banks @ power, np.finfo(np.float32).eps))


def test_fbank_is_kaldi_s_and_standardised_like_fairseq2(speech):
    _, processor = speech
    wave = clip(0.7, 1)
    ours = processor.fbank(wave)
    raw = processor._kaldi._extract_fbank_features(wave)
    for frame in (0, 17, raw.shape[0] - 1):
        np.testing.assert_allclose(raw[frame], kaldi_fbank_frame(wave, frame), atol=2e-3, rtol=1e-4)
    raw = torch.from_numpy(raw)
    torch.testing.assert_close(ours, (raw - raw.mean(0)) / raw.std(0, unbiased=True), atol=2e-4, rtol=1e-4)
    assert ours.shape == (1 + (len(wave) - 400) // 160, 80)


def test_stacked_fbank_matches_transformers_seamless_m4t_features(speech):
    from transformers import SeamlessM4TFeatureExtractor

    model, processor = speech
    wave = clip(1.1, 2)
    theirs = SeamlessM4TFeatureExtractor()(wave, sampling_rate=SR, return_tensors="pt").input_features[0]
    ours = model.encoder_frontend.feature_extractor(processor([wave]).inputs["input_features"])[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-3  # transformers adds 1e-7 to the variance; fairseq2 does not


# ---- speech encoder ---------------------------------------------------------------------------------------------
def test_conformer_layers_equal_transformers_wav2vec2_conformer(speech):
    """fairseq2's relative-position Conformer = transformers' Wav2Vec2Conformer ("relative") up to names."""
    from transformers import Wav2Vec2ConformerConfig
    from transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer import Wav2Vec2ConformerEncoder

    model, processor = speech
    cfg = model.config
    ref = Wav2Vec2ConformerEncoder(Wav2Vec2ConformerConfig(
        hidden_size=cfg.model_dim, num_hidden_layers=cfg.num_encoder_layers,
        num_attention_heads=cfg.num_encoder_attn_heads, intermediate_size=cfg.ffn_inner_dim, hidden_act="swish",
        conv_depthwise_kernel_size=cfg.depthwise_conv_kernel_size, position_embeddings_type="relative",
        max_source_positions=cfg.encoder_max_seq_len)).eval()
    table = (("self_attn.q_proj.", "self_attn.linear_q."), ("self_attn.k_proj.", "self_attn.linear_k."),
             ("self_attn.v_proj.", "self_attn.linear_v."), ("self_attn.output_proj.", "self_attn.linear_out."),
             ("self_attn.sdpa.r_proj.", "self_attn.linear_pos."), ("self_attn.sdpa.u_bias", "self_attn.pos_bias_u"),
             ("self_attn.sdpa.v_bias", "self_attn.pos_bias_v"), ("conv_layer_norm.", "conv_module.layer_norm."),
             ("conv.", "conv_module."), ("ffn1.inner_proj.", "ffn1.intermediate_dense."),
             ("ffn1.output_proj.", "ffn1.output_dense."), ("ffn2.inner_proj.", "ffn2.intermediate_dense."),
             ("ffn2.output_proj.", "ffn2.output_dense."), ("layer_norm.", "final_layer_norm."))
    state = {}
    for key, value in model.encoder.state_dict().items():  # layers.<n>.<rest>
        _, n, rest = key.split(".", 2)
        ours, theirs = next(((o, t) for o, t in table if rest.startswith(o)), ("", ""))
        state[f"layers.{n}.{theirs}{rest[len(ours):]}"] = value
    state |= {f"layer_norm.{w}": model.layer_norm.state_dict()[w] for w in ("weight", "bias")}
    missing = ref.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith("pos_conv_embed") for k in missing)
    feats = processor([clip(0.9, 3)]).inputs["input_features"]
    with torch.no_grad():
        frames = model.encoder_frontend(feats)
        ours = frames
        for layer in model.encoder.layers:
            ours = layer(ours)
        torch.testing.assert_close(model.layer_norm(ours), ref(frames).last_hidden_state, atol=1e-5, rtol=1e-4)


def test_speech_pooling_is_the_released_one_query_attention_decoder(speech):
    model, processor = speech
    batch = processor([clip(1.0, 4), clip(0.6, 5)])
    with torch.no_grad():
        out = model(**batch.inputs)
        pooler, dim = model.encoder_pooler, model.config.model_dim
        for b, row in enumerate(batch.rows):
            enc = out.last_hidden_state[b, : row.length]
            # bos row of the table * sqrt(dim) + the sinusoid at position 0: sin(0) = 0 (first half), cos(0) = 1
            x = pooler.decoder_frontend.embed.weight[2] * math.sqrt(dim) + torch.cat([torch.zeros(dim // 2),
                                                                                      torch.ones(dim // 2)])
            for layer in pooler.decoder.layers:
                sa, ca = layer.self_attn, layer.encoder_decoder_attn
                x = layer.self_attn_layer_norm(x + sa.output_proj(sa.v_proj(x)))  # one key: softmax weight 1
                heads = sa.num_heads
                q = ca.q_proj(x).view(heads, -1)
                k, v = ca.k_proj(enc).view(-1, heads, dim // heads), ca.v_proj(enc).view(-1, heads, dim // heads)
                w = torch.softmax(torch.einsum("hd,shd->hs", q, k) / math.sqrt(dim // heads), dim=-1)
                mixed = torch.einsum("hs,shd->hd", w, v).reshape(-1)
                x = layer.encoder_decoder_attn_layer_norm(x + ca.output_proj(mixed))
                x = layer.ffn_layer_norm(x + layer.ffn.output_proj(F.relu(layer.ffn.inner_proj(x))))
            torch.testing.assert_close(out.sentence_embedding[b], pooler.projection_out(x), atol=1e-5, rtol=1e-4)


def test_padded_speech_batch_gives_each_clip_what_it_gives_alone(speech):
    model, processor = speech
    clips = [clip(1.0, 6), clip(0.43, 7), clip(0.77, 8)]
    batch = processor(clips)
    assert [r.length for r in batch.rows] == [(1 + (len(c) - 400) // 160) // 2 for c in clips]
    with torch.no_grad():
        out = model(**batch.inputs, output_hidden_states=True)
        for b, c in enumerate(clips):
            alone = model(**processor([c]).inputs, output_hidden_states=True)
            n = batch.rows[b].length
            torch.testing.assert_close(out.sentence_embedding[b], alone.sentence_embedding[0], atol=1e-5, rtol=1e-4)
            for h, h1 in zip(out.hidden_states, alone.hidden_states):  # alone, an odd frame count is padded too
                torch.testing.assert_close(h[b, :n], h1[0, :n], atol=1e-5, rtol=1e-4)


# ---- checkpoints ------------------------------------------------------------------------------------------------
def test_save_and_load_round_trips_are_bit_identical(text, speech, text_dir, speech_dir, tmp_path):
    for (model, processor), directory, build, load, inputs in (
            (text, text_dir, build_tiny_sonar_text, load_sonar_text, lambda p: p(["hello world"], "eng_Latn")),
            (speech, speech_dir, build_tiny_sonar_speech, load_sonar_speech, lambda p: p([clip(0.5, 9)]))):
        again, processor2 = load(build(tmp_path / build.__name__))
        batch = inputs(processor)
        assert torch.equal(batch.inputs[next(iter(batch.inputs))], inputs(processor2).inputs[next(iter(batch.inputs))])
        with torch.no_grad():
            assert torch.equal(model(**batch.inputs).sentence_embedding, again(**batch.inputs).sentence_embedding)
        assert set(read_state_dict(next(directory.glob("*.pt")))) == set(model.state_dict())


def fairseq1_speech_key(key: str) -> str:
    """Our (fairseq2) name -> the fairseq (v1) name, written from the release's conversion table read backwards."""
    if key.startswith("layer_norm."):
        return "encoder.w2v_model.encoder." + key
    for ours, theirs in (("encoder_frontend.post_extract_layer_norm.", "encoder.w2v_model.layer_norm."),
                         ("encoder_frontend.model_dim_proj.", "encoder.w2v_model.post_extract_proj."),
                         ("encoder_pooler.decoder_frontend.embed.", "decoder.embed_tokens."),
                         ("encoder_pooler.projection_out.weight", "decoder.embed_out")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    conformer = key.startswith("encoder.layers.")
    head, rest = (key.split(".", 3)[:3], key.split(".", 3)[3]) if conformer else (key.split(".", 4)[:4],
                                                                                 key.split(".", 4)[4])
    table = ((("conv_layer_norm.", "conv_module.layer_norm."), ("conv.", "conv_module."),
              ("ffn1_layer_norm.", "ffn1.layer_norm."), ("ffn2_layer_norm.", "ffn2.layer_norm."),
              ("ffn1.inner_proj.", "ffn1.w_1."), ("ffn1.output_proj.", "ffn1.w_2."), ("ffn2.inner_proj.", "ffn2.w_1."),
              ("ffn2.output_proj.", "ffn2.w_2."), ("self_attn.q_proj.", "self_attn.linear_q."),
              ("self_attn.k_proj.", "self_attn.linear_k."), ("self_attn.v_proj.", "self_attn.linear_v."),
              ("self_attn.output_proj.", "self_attn.linear_out."), ("self_attn.sdpa.r_proj.", "self_attn.linear_pos."),
              ("self_attn.sdpa.u_bias", "self_attn.pos_bias_u"), ("self_attn.sdpa.v_bias", "self_attn.pos_bias_v"),
              ("layer_norm.", "final_layer_norm."))
             if conformer else
             (("self_attn.output_proj.", "self_attn.out_proj."), ("encoder_decoder_attn_layer_norm.",
               "encoder_attn_layer_norm."), ("encoder_decoder_attn.output_proj.", "encoder_attn.out_proj."),
              ("encoder_decoder_attn.", "encoder_attn."), ("ffn.inner_proj.", "fc1."), ("ffn.output_proj.", "fc2."),
              ("ffn_layer_norm.", "final_layer_norm.")))
    for ours, theirs in table:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours):]
            break
    prefix = f"encoder.w2v_model.encoder.layers.{head[2]}." if conformer else f"decoder.layers.{head[3]}."
    return prefix + rest


def test_fairseq1_named_speech_checkpoints_are_renamed_by_the_release_table(speech, tmp_path):
    model, _ = speech
    old = {fairseq1_speech_key(k): v for k, v in model.state_dict().items()}
    assert {"encoder.w2v_model.encoder.layers.0.self_attn.linear_pos.weight", "decoder.layers.1.fc2.bias",
            "encoder.w2v_model.encoder.layer_norm.weight", "decoder.embed_out"} <= set(old)
    torch.save({"model": old | {"encoder.w2v_model.mask_emb": torch.zeros(3)}}, tmp_path / "spenc.v3ap.fra.pt")
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    again, _ = load_sonar_speech(tmp_path / "spenc.v3ap.fra.pt")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_fairseq1_named_text_checkpoints_are_renamed_and_control_rows_reordered(text, text_dir, tmp_path):
    model, _ = text
    old = {}
    for key, value in model.state_dict().items():
        key = key.replace("encoder_frontend.embed", "embed_tokens").removeprefix("encoder.")
        for ours, theirs in (("self_attn.output_proj", "self_attn.out_proj"), ("ffn.inner_proj", "fc1"),
                             ("ffn.output_proj", "fc2"), ("ffn_layer_norm", "final_layer_norm")):
            key = key.replace(ours, theirs)
        old[key] = value.clone()
    embed = model.state_dict()["encoder_frontend.embed.weight"]
    old["embed_tokens.weight"][[1, 3, 0, 2]] = embed[[0, 1, 2, 3]]  # fairseq rows: BOS, PAD, EOS, UNK
    assert "layers.1.fc1.weight" in old and "layer_norm.weight" in old
    for name in ("sentencepiece.source.256000.model", "config.json"):
        (tmp_path / name).write_bytes((text_dir / name).read_bytes())
    torch.save({"state_dict": old}, tmp_path / "sonar_text_encoder.pt")
    again, _ = load_sonar_text(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_missing_or_foreign_checkpoints_are_one_sentence_errors(tmp_path, text_dir):
    with pytest.raises(UserError, match="spenc.v5ap.hin.pt"):
        load_sonar_speech("sonar_speech_encoder_hin")
    with pytest.raises(UserError, match="sonar_text_encoder.pt"):
        load_sonar_text("text_sonar_basic_encoder")
    torch.save({"model": {"something.else": torch.zeros(2)}}, tmp_path / "spenc.x.pt")
    with pytest.raises(UserError, match="does not match"):
        load_sonar_speech(tmp_path / "spenc.x.pt")
    with pytest.raises(UserError, match="SONAR has no text language"):
        load_sonar_text(text_dir)[1](["hello"], "xyz_Latn")


def test_real_arch_is_inferred_from_a_checkpoint_without_config(speech, tmp_path):
    model, _ = speech
    torch.save({"model": model.state_dict()}, tmp_path / "spenc.eng.pt")
    from lalm_probe.plugins.models.arch.sonar_speech import infer_config

    inferred = infer_config(model.state_dict())
    assert (inferred.model_dim, inferred.num_encoder_layers, inferred.num_decoder_layers,
            inferred.depthwise_conv_kernel_size) == (64, 2, 2, 31)


def test_nnsight_reads_encoder_layers_and_the_poolings(text, speech):
    from nnsight import NNsight

    for (model, processor), batch, pool in ((text, text[1](["hello world", "the cat"], "eng_Latn"), "pooling"),
                                            (speech, speech[1]([clip(0.5, 1), clip(0.3, 2)]), "encoder_pooler")):
        nm, layers, pooled = NNsight(model), [], []
        with torch.no_grad(), nm.trace(**batch.inputs):
            for layer in nm.encoder.layers:
                layers.append(layer.output.save())
            pooled.append(getattr(nm, pool).output.save())
        with torch.no_grad():
            out = model(**batch.inputs, output_hidden_states=True)
        assert len(layers) == 2
        for i, saved in enumerate(layers):
            torch.testing.assert_close(saved, out.hidden_states[i + 1])
        torch.testing.assert_close(pooled[0], out.sentence_embedding)
