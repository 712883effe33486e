"""BEATs, the audio-event encoder SALMONN runs beside Whisper; transformers has no class for it, so it is written
here with the module names of the released checkpoints (``microsoft/unilm`` ``beats/BEATs.py`` and ``backbone.py``,
as vendored in ``bytedance/SALMONN`` ``models/beats/``).

A 16x16 patch embedding of the Kaldi fbank, a convolutional positional embedding (weight-normed, ``pos_conv.0``),
and post-norm (DeepNorm) layers whose attention adds a gated, bucketed relative-position bias shared by all layers.
The attention follows the release's order of operations (query scaled by ``1/sqrt(d)/32``, scores shifted by their
row max and scaled back by 32) so half-precision results stay close to the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .kaldi_fbank import fbank

FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # ``BEATs.preprocess`` defaults


def beats_tokens(samples: int, patch: int = 16) -> int:
    """BEATs output tokens for a 16 kHz clip: (fbank frames // patch) time patches x (128 // patch) frequency
    patches, flattened time-major; fbank frames = 1 + (samples - 400) // 160."""
    frames = max(0, (samples - 400) // 160 + 1)
    return frames // patch * (128 // patch)


@dataclass
class BEATsConfig:
    """``BEATsConfig``; a checkpoint's ``cfg`` dict overrides these defaults."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = False
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "BEATsConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


class WeightNormConv1d(nn.Module):
    """``nn.utils.weight_norm(Conv1d, dim=2)`` with its ``weight_g`` / ``weight_v`` parameters."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel).normal_(0, 0.02))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
        return nn.functional.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the extra frame an even kernel with symmetric padding adds."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : -self.remove] if self.remove else x


class BEATsAttention(nn.Module):
    """``MultiheadAttention`` (self-attention only) with the gated relative-position bias."""

    def __init__(self, cfg: BEATsConfig, has_bias: bool) -> None:
        super().__init__()
        d, self.heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.head_dim = d // self.heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.num_buckets, self.max_distance, self.gru_rel_pos = cfg.num_buckets, cfg.max_distance, cfg.gru_rel_pos
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, self.heads)
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.heads, 1, 1))

    def _buckets(self, relative: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2
        buckets = (relative > 0).long() * half
        relative = relative.abs()
        exact = half // 2
        large = exact + (torch.log(relative.float() / exact) / math.log(self.max_distance / exact)
                         * (half - exact)).long()
        large = torch.minimum(large, torch.full_like(large, half - 1))
        return buckets + torch.where(relative < exact, relative, large)

    def position_bias(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(self._buckets(pos[None, :] - pos[:, None])).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        alpha = 32.0
        q = self.q_proj(x) * self.head_dim ** -0.5 / alpha
        k, v = self.k_proj(x), self.v_proj(x)
        q, k, v = (y.view(b, t, self.heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
        scores = q @ k.transpose(-1, -2)
        scores = (scores - scores.amax(dim=-1, keepdim=True)) * alpha
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        if bias is not None:
            if self.gru_rel_pos:
                gates = torch.sigmoid(self.grep_linear(q * alpha / self.head_dim ** -0.5).view(b, self.heads, t, 2, 4)
                                      .sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias[None]
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1).type_as(scores)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, t, d))


class BEATsLayer(nn.Module):
    """``TransformerSentenceEncoderLayer``: post-norm with DeepNorm residual scaling (``layer_norm_first`` pre-norm)."""

    def __init__(self, cfg: BEATsConfig, has_bias: bool) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        if cfg.activation_fn != "gelu":
            raise ValueError(f"BEATs activation '{cfg.activation_fn}' is not supported (released models use gelu).")
        self.self_attn = BEATsAttention(cfg, has_bias)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.encoder_ffn_embed_dim), nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.layer_norm_first = cfg.layer_norm_first
        self.deep_norm_alpha = math.pow(2 * cfg.encoder_layers, 0.25) if cfg.deep_norm else 1.0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x).float()).type_as(x))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), pad, bias)
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.deep_norm_alpha + self.self_attn(x, pad, bias))
        return self.final_layer_norm(x * self.deep_norm_alpha + self._ffn(x))


class BEATsEncoder(nn.Module):
    """``TransformerEncoder``: positional convolution, layers (the first one owns the shared bias table)."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        d = cfg.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(d, cfg.conv_pos, cfg.conv_pos_groups), SamePad(cfg.conv_pos),
                                      nn.GELU())
        self.layers = nn.ModuleList(BEATsLayer(cfg, cfg.relative_position_embedding and i == 0)
                                    for i in range(cfg.encoder_layers))
        if cfg.relative_position_embedding:  # shared, as in the release (its state dict repeats it per layer)
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(d)
        self.layer_norm_first, self.relative = cfg.layer_norm_first, cfg.relative_position_embedding

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        bias = self.layers[0].self_attn.position_bias(x.shape[1]) if self.relative else None
        for layer in self.layers:
            x = layer(x, pad, bias)
        return self.layer_norm(x) if self.layer_norm_first else x


class BEATs(nn.Module):
    """``BEATs``; :meth:`extract_features` returns the encoder output (``feature_only=True``, what SALMONN uses)."""

    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.post_extract_proj = (nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim)
                                  if cfg.embed_dim != cfg.encoder_embed_dim else None)
        p = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.conv_bias)
        self.encoder = BEATsEncoder(cfg)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.finetuned_model:
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)

    def output_lengths(self, samples: torch.Tensor) -> torch.Tensor:
        """Valid output tokens per clip (see :func:`beats_tokens`)."""
        return torch.tensor([beats_tokens(int(n), self.cfg.input_patch_size) for n in samples.tolist()],
                            device=samples.device)

    def extract_features(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Features of right-padded clips ``waves`` ``(b, samples)`` with ``lengths`` valid samples each; every
        clip's valid tokens equal what it gives alone (fbank per clip, padded patches masked and zeroed)."""
        banks = [fbank(w[:n] * 2 ** 15) for w, n in zip(waves.float(), lengths.tolist())]
        width = max(b.shape[0] for b in banks)
        feats = torch.stack([nn.functional.pad(b, (0, 0, 0, width - b.shape[0])) for b in banks])
        feats = ((feats - FBANK_MEAN) / (2 * FBANK_STD)).to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(feats.unsqueeze(1))
        x = self.layer_norm(x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2))
        valid = self.output_lengths(lengths.to(x.device))
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= valid[:, None]
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x, pad if bool(pad.any()) else None)
