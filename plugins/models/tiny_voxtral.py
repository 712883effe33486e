"""A seeded tiny Voxtral (``VoxtralForConditionalGeneration``) with an offline ``VoxtralProcessor``.

The processor's tokenizer is mistral-common's Tekken, read from a ``tekken.json`` written here: 256 byte tokens (no
merges, so any text encodes), 40 control tokens at Mistral's ids (``[AUDIO]`` must be 24: ``VoxtralProcessor``
hard-codes it) and an ``audio`` section whose 2 s chunks match the encoder's 100 positions (the real model reads
30 s chunks with 1500). Needs ``mistral-common`` (the ``voxtral`` extra).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

# Tekken's pre-tokenizer (tiktoken pat_str) as Mistral ships it.
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
CONTROL = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
           7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
           13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]",
           18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 20: "[ARGS]", 21: "[CALL_ID]", 24: "[AUDIO]",
           25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]"}
N_CONTROL = 40
CHUNK_SECONDS = 2


def write_tekken(path: Path) -> None:
    """A byte-level Tekken vocabulary with Mistral's control tokens and a 2 s audio chunk."""
    data = {
        "config": {"pattern": PATTERN, "num_vocab_tokens": 256, "default_vocab_size": 256 + N_CONTROL,
                   "default_num_special_tokens": N_CONTROL, "version": "v7"},
        "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(),
                   "token_str": bytes([i]).decode("latin-1")} for i in range(256)],
        "special_tokens": [{"rank": r, "token_str": CONTROL.get(r, f"<SPECIAL_{r}>"), "is_control": True}
                           for r in range(N_CONTROL)],
        "version": 1, "type": "Tekken",
        "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": CHUNK_SECONDS,
                  "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}},
    }
    path.write_text(json.dumps(data))


def build_tiny(out_dir: Path) -> None:
    """A 2-layer audio encoder + 4-layer Llama LM, 64 wide, with the real processor classes, seeded."""
    from transformers import (
        MistralCommonBackend,
        VoxtralConfig,
        VoxtralForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    out_dir = Path(out_dir)
    write_tekken(out_dir / "tekken.json")
    tok = MistralCommonBackend(tokenizer_path=str(out_dir / "tekken.json"))
    cfg = VoxtralConfig(
        # intermediate_size = 4 x hidden: the projector reads 4 encoder frames stacked as one audio token
        audio_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_mel_bins=128, max_source_positions=50 * CHUNK_SECONDS),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=11, bos_token_id=1, eos_token_id=2),
        audio_token_id=24)
    torch.manual_seed(0)
    model = VoxtralForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 11, 2
    model.generation_config.bos_token_id = 1
    model.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=128, chunk_length=CHUNK_SECONDS, sampling_rate=16000).save_pretrained(out_dir)
