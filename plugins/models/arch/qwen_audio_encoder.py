"""Qwen-Audio's Whisper-style audio encoder and its log-mel front end, written on plain torch.

Follows ``audio.py`` of the release (QwenLM/Qwen-Audio, shipped in the ``Qwen/Qwen-Audio-Chat`` hub repository):
module and parameter names are the released ones, so ``transformer.audio.*`` checkpoint tensors load unchanged:
``conv1``, ``conv2``, ``positional_embedding`` (a persistent buffer in the release, hence a checkpoint key),
``blocks.{i}.{attn.query,attn.key,attn.value,attn.out,attn_ln,mlp.0,mlp.2,mlp_ln}``, ``ln_post``, ``avg_pooler``
(no parameters), ``proj`` and ``audio_bos_eos_token``.

One deliberate difference, for padding invariance: the release truncates a batch of mel spectrograms to the longest
clip, so a shorter clip's last convolution window reads one real mel frame past its end, where the same clip alone
reads the convolution's zero padding. Here mel frames past ``2 * T_cnn`` are zeroed per clip first, so every clip
gives in a batch exactly what the release gives for it alone (the way ``model.chat`` runs it, one query at a time).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE, N_FFT, HOP_LENGTH, CHUNK_SECONDS = 16000, 400, 160, 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # the release pads or trims every clip to 30 s


def frames_after_cnn(mel_len: int) -> int:
    """``get_T_after_cnn`` of ``audio.py``: length after conv1 (stride 1) and conv2 (stride 2, padding 1)."""
    return (mel_len - 1) // 2 + 1


def audio_token_count(num_samples: int) -> tuple[int, int]:
    """(encoder frames after the convolutions, audio tokens after 2x pooling) for a clip of ``num_samples``.

    ``process_audio`` in ``tokenization_qwen.py``: ``mel_len = min(L, 30 s) // 160``; the span in the prompt is
    ``tokens + 2`` (the learned bos/eos vectors).
    """
    mel_len = min(num_samples, N_SAMPLES) // HOP_LENGTH
    t_cnn = frames_after_cnn(mel_len)
    return t_cnn, (t_cnn - 2) // 2 + 1


@lru_cache(maxsize=4)
def librosa_mel_filters(n_mels: int = 80) -> np.ndarray:
    """The filterbank the release stores in ``mel_filters.npz`` (``librosa.filters.mel(sr=16000, n_fft=400)``)."""
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, filters: np.ndarray) -> torch.Tensor:
    """``log_mel_spectrogram`` of ``audio.py`` on a clip already padded to 30 s: (n_mels, 3000) float32."""
    wave = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    window = torch.hann_window(N_FFT)
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(filters) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def pad_or_trim(audio: np.ndarray, length: int = N_SAMPLES) -> np.ndarray:
    """Zero-pad or cut a 1-D waveform to ``length`` samples (``pad_or_trim`` of ``audio.py``)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)[:length]
    return np.pad(audio, (0, length - audio.shape[0]))


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table (``sinusoids`` of ``audio.py``)."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class AudioAttention(nn.Module):
    """Whisper self-attention with the release's names: ``query``, ``key`` (no bias), ``value``, ``out``."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, self.n_head, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        # The release scales q and k by d**-0.25 each; SDPA's default 1/sqrt(d) is the same product.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(attn.transpose(1, 2).reshape(b, t, -1))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm Whisper encoder block: ``attn_ln`` -> ``attn`` -> ``mlp_ln`` -> ``mlp`` (Linear, GELU, Linear)."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = AudioAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), mask=mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """``transformer.audio``: mel (B, n_mels, 3000) -> audio token features (B, T_cnn_max // 2, output_dim).

    ``input_audio_lengths`` is ``(B, 2)``: frames after the convolutions and audio tokens, as ``process_audio``
    builds it. Rows past a clip's length are padding (masked in attention, zeroed before the blocks).
    """

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int, output_dim: int = 512,
                 avg_pool: bool = True, add_audio_bos_eos_token: bool = True, **_: object) -> None:
        super().__init__()
        self.n_head = n_head
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)
        self.avg_pooler = nn.AvgPool1d(2, stride=2) if avg_pool else None
        self.proj = nn.Linear(n_state, output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, output_dim) if add_audio_bos_eos_token else None

    def forward(self, input_audios: torch.Tensor, input_audio_lengths: torch.Tensor) -> torch.Tensor:
        x = input_audios.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
        t_cnn = input_audio_lengths[:, 0].to(x.device).long()
        mel_keep = 2 * t_cnn  # the release keeps this many mel frames for a clip alone
        x = x[:, :, : int(mel_keep.max())]
        frame = torch.arange(x.shape[-1], device=x.device)
        x = x * (frame[None, :] < mel_keep[:, None]).unsqueeze(1).to(x.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        src_len = x.shape[1]
        x = (x + self.positional_embedding[:src_len].to(x.dtype)).to(x.dtype)
        pad = torch.arange(src_len, device=x.device)[None, :] >= t_cnn[:, None]  # (B, T)
        x = x.masked_fill(pad.unsqueeze(-1), 0.0)
        mask = torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill(pad, torch.finfo(x.dtype).min)
        mask = mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask=mask)
        if self.avg_pooler is not None:
            x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
        return self.proj(self.ln_post(x))

    def span_embeddings(self, features: torch.Tensor, input_audio_lengths: torch.Tensor) -> list[torch.Tensor]:
        """Per clip: ``[bos, its audio tokens, eos]``, what the LM writes over ``<audio> ... </audio>`` (``encode``)."""
        spans = []
        for row, n_tokens in enumerate(input_audio_lengths[:, 1].tolist()):
            audio = features[row, :n_tokens]
            if self.audio_bos_eos_token is not None:
                bos_eos = self.audio_bos_eos_token.weight.to(audio.dtype)
                audio = torch.cat([bos_eos[:1], audio, bos_eos[1:]])
            spans.append(audio)
        return spans

    def reset_positional_embedding(self) -> None:
        """Refill the sinusoid table (used when a checkpoint does not carry it)."""
        n_ctx, n_state = self.positional_embedding.shape
        with torch.no_grad():
            self.positional_embedding.copy_(sinusoids(n_ctx, n_state).to(self.positional_embedding))


def init_audio_module(module: nn.Module, std: float) -> None:
    """Seeded initialisation of one audio-encoder module (tiny instances; real weights overwrite it)."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, AudioEncoder):
        module.reset_positional_embedding()


__all__ = ["AudioEncoder", "audio_token_count", "frames_after_cnn", "log_mel_spectrogram", "pad_or_trim",
           "librosa_mel_filters", "init_audio_module"]
