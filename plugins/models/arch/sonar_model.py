"""SONAR's text encoder and one speech encoder as one module, so one plugin reads both (seed 001 compares them).

The release ships them as separate fairseq2 models (``text_sonar_basic_encoder`` and one
``sonar_speech_encoder_<lang>`` per language); :class:`SonarModel` holds one of each, routes ``input_ids`` to the text
encoder and fbank ``input_features`` to the speech encoder, and returns that encoder's :class:`SonarEncoderOutput`
(states, pooled sentence embedding, and ``hidden_states`` when asked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lalm_probe.core.errors import UserError
from torch import nn

from .sonar_checkpoint import BASE_URL, speech_checkpoint_file
from .sonar_nn import SonarEncoderOutput
from .sonar_speech import SonarSpeechEncoder, SonarSpeechProcessor, build_tiny_sonar_speech, load_sonar_speech
from .sonar_text import SonarTextEncoder, SonarTextProcessor, build_tiny_sonar_text, load_sonar_text

SPEECH_FOLDER = "speech"


class SonarModel(nn.Module):
    """``text_encoder`` and ``speech_encoder`` side by side; a batch is text or speech, never both."""

    def __init__(self, text_encoder: SonarTextEncoder, speech_encoder: SonarSpeechEncoder) -> None:
        super().__init__()
        self.text_encoder, self.speech_encoder = text_encoder, speech_encoder

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, output_hidden_states: bool = False,
                **_: Any) -> SonarEncoderOutput:
        if input_features is not None:
            return self.speech_encoder(input_features, attention_mask, output_hidden_states=output_hidden_states)
        return self.text_encoder(input_ids, attention_mask, output_hidden_states=output_hidden_states)


class SonarProcessor:
    """The two pipelines' input sides; ``tokenizer`` is the text side's NLLB tokenizer."""

    sampling_rate = 16000

    def __init__(self, text: SonarTextProcessor, speech: SonarSpeechProcessor) -> None:
        self.text, self.speech, self.tokenizer = text, speech, text.tokenizer


def load_sonar(source: str | Path, *, speech_encoder: str | Path | None = None, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", trust_pickle: bool = False) -> tuple[SonarModel, SonarProcessor]:
    """The text encoder from the directory ``source`` (see :func:`~.sonar_text.load_sonar_text`) and the speech
    encoder from ``speech_encoder`` (a ``spenc.*.pt`` file or its folder), by default ``<source>/speech``."""
    text, text_proc = load_sonar_text(source, dtype=dtype, device=device, trust_pickle=trust_pickle)
    if speech_encoder is None:
        speech_encoder = Path(str(source)) / SPEECH_FOLDER
        if not speech_encoder.exists():
            raise UserError(f"SONAR: '{source}' has no '{SPEECH_FOLDER}' folder and no speech_encoder was given; "
                            f"speech encoders are per language: download one (e.g. {BASE_URL}"
                            f"{speech_checkpoint_file('eng')}) and pass speech_encoder=<file or folder>.")
    speech, speech_proc = load_sonar_speech(speech_encoder, dtype=dtype, device=device, trust_pickle=trust_pickle)
    return SonarModel(text, speech).eval(), SonarProcessor(text_proc, speech_proc)


def build_tiny_sonar(out_dir: str | Path, seed: int = 0) -> Path:
    """The seeded tiny text encoder (release files + ``config.json``) with the tiny English speech encoder in
    ``speech/``."""
    out = build_tiny_sonar_text(out_dir, seed=seed)
    build_tiny_sonar_speech(out / SPEECH_FOLDER, seed=seed + 1)
    return out
