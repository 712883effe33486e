"""Kaldi log-mel filterbanks in plain torch, the ``torchaudio.compliance.kaldi.fbank`` BEATs calls.

BEATs (``models/beats/BEATs.py`` ``preprocess``) computes ``fbank(wave * 2**15, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10)`` with every other option at its default: no dither, DC
offset removed per frame, pre-emphasis 0.97, Povey window, FFT size rounded up to a power of two, power spectrum,
Kaldi mel banks from 20 Hz to Nyquist, log floored at float32 epsilon, ``snip_edges``. torchaudio has no wheel for
the project's torch, so the same steps are written here (checked against ``kaldi-native-fbank`` in the tests).
"""

from __future__ import annotations

import math

import torch


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def mel_banks(num_bins: int, n_fft: int, sample_rate: float, low_freq: float = 20.0,
              high_freq: float = 0.0) -> torch.Tensor:
    """Triangular Kaldi mel filters, ``(num_bins, n_fft // 2 + 1)`` (the Nyquist column is zero, as in Kaldi)."""
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0 else nyquist + high_freq
    n_bins_fft = n_fft // 2
    mel_low, mel_high = _mel(torch.tensor(low_freq)), _mel(torch.tensor(high))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = _mel(sample_rate / n_fft * torch.arange(n_bins_fft, dtype=torch.float32)).unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


def fbank(waveform: torch.Tensor, *, num_mel_bins: int = 128, sample_rate: float = 16000.0,
          frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, preemphasis: float = 0.97) -> torch.Tensor:
    """Log mel energies ``(frames, num_mel_bins)`` of a mono ``waveform`` ``(samples,)``; frames = 1 + (n - 400) // 160
    at 16 kHz (none for fewer than 400 samples)."""
    x = waveform.to(torch.float32).reshape(-1)
    size = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    n_fft = 1 << math.ceil(math.log2(size))
    if x.numel() < size:
        return torch.zeros(0, num_mel_bins)
    frames = x.unfold(0, size, shift)  # (m, size), snip_edges
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # replicate-padded shift
    frames = frames - preemphasis * previous
    window = torch.hann_window(size, periodic=False, dtype=torch.float32).pow(0.85)
    frames = torch.nn.functional.pad(frames * window, (0, n_fft - size))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    energies = power @ mel_banks(num_mel_bins, n_fft, sample_rate).T
    return torch.clamp(energies, min=torch.finfo(torch.float32).eps).log()
