"""A pure-torch stand-in for ``torchaudio.transforms.MelSpectrogram``, for feature extractors that need torchaudio.

torchaudio publishes no wheel for every torch release (none for torch 2.13), but ``GraniteSpeechFeatureExtractor``
builds its features with ``torchaudio.transforms.MelSpectrogram``. :func:`install` gives that module this class
when torchaudio cannot be imported; it computes what torchaudio's defaults compute (periodic Hann window, centred
frames with reflect padding, power 2, HTK mel filters without normalisation), checked against librosa in the tests.
The feature extractor keeps its class and saved config, so a processor saved here loads anywhere.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch


class MelSpectrogram(torch.nn.Module):
    """``torchaudio.transforms.MelSpectrogram`` with its defaults: ``(..., samples) -> (..., n_mels, frames)``."""

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, win_length: int | None = None,
                 hop_length: int | None = None, f_min: float = 0.0, f_max: float | None = None, n_mels: int = 128,
                 **_: Any) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.n_fft, self.win_length = n_fft, win_length or n_fft
        self.hop_length = hop_length or self.win_length // 2
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        banks = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                                max_frequency=f_max or sample_rate / 2, sampling_rate=sample_rate, norm=None,
                                mel_scale="htk")
        self.register_buffer("banks", torch.as_tensor(banks, dtype=torch.float32), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        shape = waveform.shape
        spec = torch.stft(waveform.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.win_length, self.window,
                          center=True, pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        mel = torch.matmul(spec.abs().pow(2).transpose(-1, -2), self.banks).transpose(-1, -2)
        return mel.reshape(*shape[:-1], *mel.shape[-2:])


def install(module_name: str) -> None:
    """Let ``module_name`` (a transformers feature-extraction module) use :class:`MelSpectrogram` when torchaudio is
    missing: its ``torchaudio`` becomes a stand-in and its torchaudio backend check passes."""
    module = importlib.import_module(module_name)
    if getattr(module, "torchaudio", None) is not None or getattr(module, "_probe_melspec", False):
        return
    try:
        import torchaudio  # noqa: F401
        return
    except ImportError:
        pass
    checks = module.requires_backends

    def requires_backends(obj: Any, backends: Any) -> None:
        rest = [b for b in ([backends] if isinstance(backends, str) else backends) if b != "torchaudio"]
        if rest:
            checks(obj, rest)

    module.torchaudio = types.SimpleNamespace(transforms=types.SimpleNamespace(MelSpectrogram=MelSpectrogram))
    module.requires_backends = requires_backends
    module._probe_melspec = True
