"""Qwen2.5-Omni's thinker (``Qwen2_5OmniThinkerForConditionalGeneration``): packed audio tower + Qwen2.5 LM.

The thinker is the part that hears and writes text; the talker and the vocoder (speech output) are not loaded.
Sources: a hub id (default ``Qwen/Qwen2.5-Omni-7B``; ``Qwen/Qwen2.5-Omni-3B``), a local directory, or ``tiny``.

What differs from Qwen2-Audio, and how it is exposed:

- The audio tower packs every clip of a batch into one sequence with no batch axis: each layer returns
  ``((sum of frames, units),)`` and its modules ``(sum of frames, units)``; attention stays within 2 s chunks of a
  clip. Its layers are read through the ``packed`` layout as one row, and each clip is the
  span ``Positions(offset=<its start in the packed sequence>, length=<its frames>, row=0)``, so
  ``audio_encoder.*.out@mean`` is each clip's own mean (a clip of L mel frames has ``(L-1)//2+1`` of them).
- After the layers the tower averages pairs of frames, norms (``ln_post``) and projects into the LM (``proj``):
  those extras are read on the pooled axis (``audio_pooled``), one position per ``<|AUDIO|>`` token.
- The LM uses 3-D mRoPE positions that the model computes itself (``get_rope_index``), so no ``position_ids`` are
  passed; for audio and text alone they count valid positions, which keeps a padded row's positions its own.
- The full processor needs torchvision for its video part; :class:`~.audio_chat.AudioChat` is its audio path.
"""

from __future__ import annotations

from typing import Any

import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.positions import Positions, conv_length, pool_length
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.vocab import Component

from .audio_chat import AudioChat
from .tiny_qwen_omni import build_qwen2_5_omni


def audio_tokens(frames: torch.Tensor) -> torch.Tensor:
    """``<|AUDIO|>`` tokens for a clip of ``frames`` valid mel frames: the stride-2 convolution, then pairs."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


class OmniProcessor(AudioChat):
    """What ``Qwen2_5OmniProcessor`` does with text and audio: features padded to the extractor's window."""

    @classmethod
    def from_pretrained(cls, source: Any, **kwargs: Any) -> "OmniProcessor":
        return super().from_pretrained(source, tokens=audio_tokens, audio_kwargs=dict(
            sampling_rate=16000, return_attention_mask=True, padding="max_length"))


def packed_clips(lengths: list[int], clip: int, row_key: str) -> dict[str, Positions]:
    """Clip ``clip`` of a packed sequence of clips with these lengths: its start and length in row 0."""
    return {row_key: Positions(sum(lengths[:clip]), lengths[clip], row=0)}


class Qwen25Omni(AudioLM):
    name = "qwen2.5-omni"
    description = "Qwen2.5-Omni thinker (7B / 3B): packed Whisper-style audio tower + Qwen2.5 LM with mRoPE"
    default_checkpoint = "Qwen/Qwen2.5-Omni-7B"
    hub_ids = ("Qwen/Qwen2.5-Omni-7B", "Qwen/Qwen2.5-Omni-3B")
    model_class = "Qwen2_5OmniThinkerForConditionalGeneration"
    processor_class = OmniProcessor
    tiny = build_qwen2_5_omni
    audio_token = "<|AUDIO|>"
    pass_position_ids = False  # the model's own mRoPE positions (get_rope_index)
    stacks = (
        Stack("audio_encoder", layers=("model.audio_tower.layers",), components=bart_layer(layout="packed"),
              extras={"norm": Component("model.audio_tower.ln_post", layout="packed", positions="audio_pooled"),
                      "projector": Component("model.audio_tower.proj", layout="packed", positions="audio_pooled")}),
        Stack("lm", layers=("model.language_model.layers",), runs="per_step", components=decoder_layer(),
              final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states"),
    )

    def audio_positions(self, inputs: dict, clip: int) -> dict[str, Positions]:
        frames = inputs["feature_attention_mask"].sum(-1)
        return {**packed_clips([conv_length(int(f)) for f in frames], clip, "audio_encoder"),
                **packed_clips([pool_length(conv_length(int(f))) for f in frames], clip, "audio_pooled")}


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Qwen25Omni]
