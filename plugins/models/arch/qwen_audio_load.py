"""Load Qwen-Audio-Chat (``Qwen/Qwen-Audio-Chat`` or a local copy) into our classes, or build a tiny seeded copy.

The release directory holds ``config.json``, ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``,
``qwen.tiktoken``, ``mel_filters.npz`` and the remote code (never imported here). The weights load by name into
:class:`~.qwen_audio.QWenLMHeadModel`; the tokenizer and mel filters into :class:`~.qwen_audio_processor.
QwenAudioProcessor`. ``generation_config.json`` of the release (sampling, top-p 0.5) is not used: generation here is
greedy and stops at ``<|im_end|>``, ``<|im_start|>`` or ``<|endoftext|>`` (the release's chatml stop words).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lalm_probe.core.errors import UserError
from transformers import GenerationConfig

from .qwen_audio import QWenConfig, QWenLMHeadModel
from .qwen_audio_processor import QwenAudioProcessor
from .qwen_audio_tokenizer import VOCAB_FILE, QwenTokenizer, special_tokens

DEFAULT_HUB_ID = "Qwen/Qwen-Audio-Chat"
RELEASE_FILES = ["*.json", "*.safetensors", VOCAB_FILE, "mel_filters.npz"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_checkpoint_dir(source: str | Path, needed: str, what: str, patterns: list[str]) -> Path:
    """A local directory holding ``needed``: ``source`` itself, or the hub snapshot (cache first, then download).

    Any failure is one :class:`UserError` sentence saying what to download.
    """
    src = str(source)
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / needed).exists():
            raise UserError(f"'{src}' has no {needed}; point at the directory of a full {what} download.")
        return path
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise UserError(f"{what} checkpoint '{src}' is not a directory or a hub id (owner/name).")
    try:
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(src, allow_patterns=patterns, local_files_only=True)
        except Exception:  # not cached: try the hub once
            local = snapshot_download(src, allow_patterns=patterns)
    except Exception as exc:
        raise UserError(f"Could not get {what} '{src}' from the Hugging Face cache or hub "
                        f"({str(exc).splitlines()[0][:120]}); download it on a machine with network access "
                        f"(`hf download {src}`) and pass the local directory.") from None
    if not (Path(local) / needed).exists():
        raise UserError(f"The download of '{src}' has no {needed}; is it a {what} checkpoint?")
    return Path(local)


def generation_config(tokenizer: QwenTokenizer) -> GenerationConfig:
    """Greedy decoding that ends at the chatml stop tokens."""
    return GenerationConfig(do_sample=False, num_beams=1, pad_token_id=tokenizer.eod_id,
                            eos_token_id=[tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id])


def load_qwen_audio_chat(source: str | Path = DEFAULT_HUB_ID, *, dtype: str | torch.dtype = "float32",
                         device: str | torch.device = "cpu", device_map: str | dict | None = None,
                         ) -> tuple[QWenLMHeadModel, QwenAudioProcessor]:
    """Model and processor from a hub id or a local directory in the release's layout (weights load by name)."""
    path = resolve_checkpoint_dir(source, VOCAB_FILE, "Qwen-Audio-Chat", RELEASE_FILES)
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise UserError(f"Unknown dtype '{dtype}'. Choose one of: {', '.join(DTYPES)}.")
    processor = QwenAudioProcessor.from_pretrained(path)
    config = QWenConfig.from_pretrained(path)
    if config.audio_start_id != processor.tokenizer.audio_start_id:
        raise UserError(f"'{path}': config.json puts <audio> at {config.audio_start_id} but qwen.tiktoken at "
                        f"{processor.tokenizer.audio_start_id}; the files come from different releases.")
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = QWenLMHeadModel.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"Could not load the Qwen-Audio-Chat weights from '{path}' "
                        f"({str(exc).splitlines()[0][:160]}).") from None
    if device_map is None:
        model = model.to(device)
    model.generation_config = generation_config(processor.tokenizer)
    return model.eval(), processor


def tiny_ranks() -> dict[bytes, int]:
    """A byte-level BPE table: the 256 bytes, then a few merges (each reachable from the ones before it)."""
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"th", b"he", b"in", b"er", b"an", b"is", b"ou", b"at", b"en", b"on", b"re", b"es", b"ng",
                  b" t", b" a", b" s", b" w", b" i", b"the", b" the", b"ing", b" is", b"ak", b"er ", b"Wh", b"What",
                  b" spe", b"eak", b"ker", b"\n\n", b"ge", b"der", b"nder", b" gender", b"ant"):
        ranks.setdefault(merge, len(ranks))
    return ranks


def build_tiny_qwen_audio_chat(out_dir: str | Path, seed: int = 0) -> Path:
    """A seeded 2-layer, 64-wide Qwen-Audio-Chat (same classes, real special-token layout) saved like the release:
    sharded safetensors with an index, ``config.json``, ``qwen.tiktoken``, ``mel_filters.npz``."""
    out = Path(out_dir)
    tokenizer = QwenTokenizer(tiny_ranks())
    processor = QwenAudioProcessor(tokenizer)
    n_vocab = len(tokenizer.mergeable_ranks) + len(special_tokens())
    config = QWenConfig(
        vocab_size=(n_vocab + 63) // 64 * 64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        kv_channels=16, intermediate_size=256, max_position_embeddings=1024,
        audio=dict(n_mels=80, n_ctx=1500, n_state=64, n_head=4, n_layer=2, output_dim=64, avg_pool=True,
                   add_audio_bos_eos_token=True, audio_start_id=tokenizer.audio_start_id))
    torch.manual_seed(seed)
    model = QWenLMHeadModel(config).eval()
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out, max_shard_size="300KB")
    processor.save_pretrained(out)
    return out
