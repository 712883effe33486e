"""Audio Flamingo 3 (``AudioFlamingo3ForConditionalGeneration``): Whisper-style encoder + MLP projector + Qwen2 LM.

Sources: a hub id (default ``nvidia/audio-flamingo-3-hf``), a local directory, or ``tiny``.

The processor cuts each clip into 30 s windows (up to 10 min) and stacks the windows on the encoder's batch axis;
the LM gets one ``<sound>`` token per pooled frame of the whole clip. The encoder is read through the ``packed``
layout, all windows as one row, so a clip is one span (its windows are consecutive and all but the last full):
``audio_encoder.*.out@mean`` is the mean over the whole clip, however many windows it has. The encoder's pooled
norm and the projector (``linear_1``, GELU, ``linear_2``) are read on the pooled axis (``audio_pooled``), one
position per ``<sound>`` token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.positions import Positions, conv_length, pool_length
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.tiny import byte_level_tokenizer
from lalm_probe.core.vocab import Component

AUDIO_TOKEN = "<sound>"
# The checkpoint's turn format (nvidia/audio-flamingo-3-hf, as transformers' processor test renders it): a default
# system turn, then each user turn as its <sound> placeholders followed by its text.
TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for item in message.content %}{%- if item.type == 'audio' or 'audio' in item %}"
    "{{- '<sound>' }}{%- endif %}{%- endfor %}{%- for item in message.content %}{%- if item.type == 'text' %}"
    "{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny(out_dir: Path) -> None:
    """A 2+4-layer, 64-wide Audio Flamingo 3 with the real processor and 1 s windows, seeded."""
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        Qwen2Tokenizer,
        WhisperFeatureExtractor,
    )

    tok = byte_level_tokenizer(Qwen2Tokenizer, ["<|im_start|>", "<|im_end|>", AUDIO_TOKEN])
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=1, sampling_rate=16000)  # 1 s windows: multi-window
    processor = AudioFlamingo3Processor(feature_extractor=fe, tokenizer=tok, chat_template=TEMPLATE)
    cfg = AudioFlamingo3Config(
        audio_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          num_mel_bins=128, max_source_positions=50),  # = encoder frames per window
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False),
        audio_token_id=tok.convert_tokens_to_ids(AUDIO_TOKEN))
    torch.manual_seed(0)
    model = AudioFlamingo3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


class AudioFlamingo3(AudioLM):
    name = "audioflamingo3"
    description = "Audio Flamingo 3: Whisper-style encoder over 30 s windows + MLP projector + Qwen2.5-7B LM"
    default_checkpoint = "nvidia/audio-flamingo-3-hf"
    hub_ids = ("nvidia/audio-flamingo-3-hf",)
    model_class = "AudioFlamingo3ForConditionalGeneration"
    tiny = build_tiny
    audio_token = AUDIO_TOKEN
    stacks = (
        Stack("audio_encoder", layers=("model.audio_tower.layers",), components=bart_layer(layout="packed"),
              extras={"norm": Component("model.audio_tower.layer_norm", layout="packed", positions="audio_pooled"),
                      "projector": Component("model.multi_modal_projector", layout="packed", positions="audio_pooled",
                                             width=lambda m: m.linear_2.out_features)}),
        Stack("lm", layers=("model.language_model.layers",), runs="per_step", components=decoder_layer(),
              final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states"),
    )

    def max_seconds(self) -> float:
        fe = self.processor.feature_extractor  # whole windows up to the processor's cap (10 min); it cuts the rest
        return (self.processor.max_audio_len // fe.chunk_length) * fe.chunk_length

    def encode(self, texts: list[str], clips: list[np.ndarray]) -> dict[str, Any]:
        # How many windows the processor cuts each clip into (the inputs do not say which windows are whose).
        window = self.sample_rate * self.processor.feature_extractor.chunk_length
        most = int(self.processor.max_audio_len // self.processor.feature_extractor.chunk_length)
        self.windows = [min(most, max(1, -(-len(c) // window))) for c in clips]
        # The processor pads text by default; a flat padding=True would also pad the windows to the longest clip,
        # and the encoder takes full windows only.
        return dict(self.processor(text=texts, audio=clips or None, return_tensors="pt"))

    def audio_positions(self, inputs: dict, clip: int) -> dict[str, Positions]:
        mask = inputs["input_features_mask"]
        first = sum(self.windows[:clip])
        frames = [conv_length(int(n)) for n in mask[first:first + self.windows[clip]].sum(-1)]
        width = conv_length(mask.shape[1])  # encoder positions per window
        return {"audio_encoder": Positions(first * width, sum(frames), row=0),
                "audio_pooled": Positions(first * pool_length(width), sum(map(pool_length, frames)), row=0)}


@hookimpl
def lalm_probe_models() -> list[type]:
    return [AudioFlamingo3]
