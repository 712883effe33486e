"""Voxtral (``VoxtralForConditionalGeneration``): Whisper-large-v3-style audio encoder + Llama/Mistral LM.

Sources: a hub id (default ``mistralai/Voxtral-Mini-3B-2507``), a local directory, or ``tiny`` (a seeded random
instance of the real class with an offline Tekken processor). Needs ``mistral-common`` (``pip install
'lalm-probe[voxtral]'``): Voxtral's chat template lives in mistral-common, which takes audio as a path or base64
only, so each clip is handed over as a 32-bit float WAV in base64 (lossless).

How audio reaches the LM. The processor pads every clip with silence to whole chunks (30 s; 2 s on the tiny
instance) and stacks the chunks on the encoder's batch axis, so the ``audio_encoder`` row of a clip is a chunk
(``Positions(row=<chunk>)``). Its frames are 20 ms each (1500 per chunk); after the encoder, 4 consecutive frames
are joined into one LM token (375 per chunk, 12.5 per second) by ``multi_modal_projector``, and every token of every
chunk, trailing silence included, is an ``[AUDIO]`` placeholder in the LM. So:

- ``audio_encoder``: the clip's frames with audio in its first chunk (a clip longer than one chunk is read there
  on its first 30 s; its later chunks are the following rows of the batch axis and reach the LM only through the
  projector and the ``audio`` span).
- ``audio_encoder.projector`` (the LM's input for the audio): one row per audio token of the whole clip, every
  chunk in order, token ``k * 375 + j`` holding frames ``4j .. 4j + 3`` of chunk ``k``; it lines up one to one with
  the LM's ``audio`` span.
- ``lm``: ``audio`` is exactly the ``[AUDIO]`` run (after ``[BEGIN_AUDIO]``), ``text`` the user's words.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from lalm_probe.core.audio_lm import AudioLM
from lalm_probe.core.errors import UserError
from lalm_probe.core.model import Prompt, load_pretrained, transformers_class
from lalm_probe.core.positions import Positions, conv_length
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.tiny_voxtral import build_tiny

FRAMES_PER_TOKEN = 4  # encoder frames joined into one LM token (audio_config.intermediate_size / hidden_size)


def wav_base64(clip: np.ndarray, sample_rate: int) -> str:
    """A clip as base64 of a float WAV: mistral-common's chat template accepts audio only as a path or base64."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(clip, dtype=np.float32), sample_rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


class Voxtral(AudioLM):
    name = "voxtral"
    description = "Voxtral (Mini 3B / Small 24B): Whisper-style audio encoder in 30 s chunks + Mistral LM"
    default_checkpoint = "mistralai/Voxtral-Mini-3B-2507"
    hub_ids = ("mistralai/Voxtral-Mini-3B-2507", "mistralai/Voxtral-Small-24B-2507")
    model_class = "VoxtralForConditionalGeneration"
    tiny = build_tiny
    audio_token = "[AUDIO]"
    stacks = (
        Stack("audio_encoder", layers=("model.audio_tower.layers",), components=bart_layer(),
              extras={"norm": "model.audio_tower.layer_norm",
                      "projector": Component("model.multi_modal_projector", layout="packed", positions="audio_tokens",
                                             width=lambda m: m.linear_2.out_features)}),
        Stack("lm", layers=("model.language_model.layers",), runs="per_step", components=decoder_layer(),
              final_norm=("model.language_model.norm",), unembed=("lm_head",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        """The model as usual; the processor rebuilt with mistral-common's tokenizer, which
        ``VoxtralProcessor.from_pretrained`` silently replaces by a plain tokenizer without Voxtral's template."""
        try:
            import mistral_common  # noqa: F401
            from transformers import MistralCommonBackend, VoxtralProcessor, WhisperFeatureExtractor
        except ImportError:
            raise UserError("Voxtral needs mistral-common for its chat template and tokenizer: "
                            "pip install 'lalm-probe[voxtral]'.") from None

        class Processor:  # from_pretrained of the two parts, under the names load_pretrained calls
            @staticmethod
            def from_pretrained(src: str) -> Any:
                return VoxtralProcessor(WhisperFeatureExtractor.from_pretrained(src),
                                        MistralCommonBackend.from_pretrained(src))

        return load_pretrained(transformers_class(cls.model_class), Processor, source, device=device, dtype=dtype,
                               device_map=device_map, plugin=cls.name)

    # ---- chunks ----------------------------------------------------------------------------------------
    @property
    def chunk_frames(self) -> int:
        """Encoder frames per chunk (1500 for 30 s)."""
        return int(self.model.config.audio_config.max_source_positions)

    @property
    def chunk_samples(self) -> int:
        """Samples per chunk: two mel frames per encoder frame (480 000 for 30 s at 16 kHz)."""
        return 2 * self.chunk_frames * int(self.processor.feature_extractor.hop_length)

    # ---- prompt and inputs -----------------------------------------------------------------------------
    def render(self, item: Any, prompt: Prompt) -> list[dict[str, Any]]:  # type: ignore[override]
        """The conversation itself: mistral-common renders and tokenizes it in :meth:`encode` (its text form is
        documented as unsafe to re-tokenize)."""
        return self.conversation(item, prompt)

    def encode(self, texts: list, clips: list[np.ndarray]) -> dict[str, Any]:
        """``VoxtralProcessor.apply_chat_template`` on the batch of conversations, each clip in its audio slot."""
        todo = iter(clips)
        convs = [[{**turn, "content": [{"type": "audio", "base64": wav_base64(next(todo), self.sample_rate)}
                                       if part.get("type") == "audio" else part for part in turn["content"]]}
                  for turn in conv] for conv in texts]
        continues = any(conv[-1]["role"] == "assistant" for conv in convs)
        if continues and not all(conv[-1]["role"] == "assistant" for conv in convs):
            raise UserError("Voxtral: either every item of a batch continues an assistant prefix or none does.")
        out = self.processor.apply_chat_template(
            convs, continue_final_message=continues,
            processor_kwargs={"audio_kwargs": {"pad_to_multiple_of": self.chunk_samples,
                                               "max_source_positions": 2 * self.chunk_frames}})
        self._clips = [len(c) for c in clips]  # audio_positions reads them while this batch is prepared
        return dict(out)

    def audio_positions(self, inputs: dict[str, Any], clip: int) -> dict[str, Positions]:
        chunks = [max(1, -(-n // self.chunk_samples)) for n in self._clips]
        first = sum(chunks[:clip])
        per_chunk = self.chunk_frames // FRAMES_PER_TOKEN
        mel_frames = -(-self._clips[clip] // self.processor.feature_extractor.hop_length)
        frames = min(self.chunk_frames, conv_length(mel_frames))  # the stride-2 convolution halves them
        return {"audio_encoder": Positions(0, frames, row=first),
                "audio_tokens": Positions(first * per_chunk, chunks[clip] * per_chunk, row=0)}


@hookimpl
def lalm_probe_models() -> list[type]:
    return [Voxtral]
