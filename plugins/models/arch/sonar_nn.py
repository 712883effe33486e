"""fairseq2's transformer and Conformer blocks as SONAR uses them, with fairseq2's module names, on plain torch.

Follows fairseq2 0.4 (the version SONAR's ``pyproject.toml`` pins): ``nn/transformer/_multihead_attention.py``
(``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``), ``_relative_attention.py`` (Transformer-XL relative positions:
``sdpa.u_bias``, ``sdpa.v_bias``, ``sdpa.r_proj`` and the shift trick), ``_ffn.py`` (``inner_proj``, ``output_proj``),
``_encoder_layer.py`` / ``_decoder_layer.py`` (``self_attn_layer_norm``, ``encoder_decoder_attn``, ``ffn_layer_norm``;
pre- or post-norm), ``nn/_position_encoder.py`` (sinusoidal tables: sines in the first half, cosines in the second,
with the legacy fairseq offset of ``pad_idx + 1``), ``models/transformer/_frontend.py`` (embeddings scaled by
sqrt(model_dim)) and ``models/conformer/`` (``ffn1``/``self_attn``/``conv``/``ffn2`` with their layer norms and a
final ``layer_norm``; convolution ``pointwise_conv1`` -> GLU -> ``depthwise_conv`` -> ``batch_norm`` -> SiLU ->
``pointwise_conv2`` on zeroed padding). Positional tables are computed on the fly in float32 exactly as fairseq2 fills
its non-persistent buffers, so they are not state-dict keys here either. Dropout is left out (inference only).
Layers return tensors, so a layer's output is the residual stream to read or edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class SonarEncoderOutput(ModelOutput):
    """``SonarEncoderOutput`` of the release, transformers-style: encoder states, pooled sentence embedding."""

    last_hidden_state: torch.Tensor | None = None
    sentence_embedding: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # (B, S) 1 = valid position of last_hidden_state
    hidden_states: tuple[torch.Tensor, ...] | None = None  # frontend output, then each layer's output


@dataclass
class SonarRow:
    """One row's valid length on the encoder's sequence axis and its named spans ``[start, end)``."""

    length: int
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class SonarBatch:
    """Model inputs and per-row layout (rows are right-padded: valid positions start at 0)."""

    inputs: dict[str, torch.Tensor]
    rows: list[SonarRow]


def sinusoidal_table(steps: torch.Tensor, dim: int) -> torch.Tensor:
    """``_fill_sin_freq_table``: (len(steps), dim), sin(step * f_i) then cos(step * f_i), f_i = 1e4^(-i/(dim/2-1))."""
    num_sin = dim // 2
    indices = torch.arange(num_sin, device=steps.device, dtype=torch.float32)
    freqs = torch.exp(indices * -math.log(10000.0) / (num_sin - 1))
    table = torch.outer(steps.float(), freqs)
    return torch.cat([table.sin(), table[:, : dim - num_sin].cos()], dim=-1)


def relative_position_table(seq_len: int, dim: int, device: torch.device) -> torch.Tensor:
    """``RelativePositionalEncoding(seqs)``: rows for relative positions S-1 .. 0 .. -(S-1), sin/cos interleaved."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -math.log(10000.0) / dim)
    positive = torch.outer(torch.arange(seq_len - 1, -1, -1, device=device, dtype=torch.float32), freqs)
    negative = torch.outer(torch.arange(1, seq_len, device=device, dtype=torch.float32), freqs)
    table = torch.empty(2 * seq_len - 1, dim, device=device)
    table[:seq_len, 0::2], table[:seq_len, 1::2] = torch.sin(positive), torch.cos(positive)
    table[seq_len:, 0::2], table[seq_len:, 1::2] = torch.sin(-1 * negative), torch.cos(-1 * negative)
    return table


def padding_bias(valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, 1, 1, S_k) additive mask that hides padded keys, or None without padding."""
    if valid is None:
        return None
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class RelativePositionSDPA(nn.Module):
    """Transformer-XL attention: content term with ``u_bias``, position term ``(q + v_bias) r^T`` shifted to (S, S)."""

    def __init__(self, model_dim: int, num_heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.num_heads, self.max_seq_len = num_heads, max_seq_len
        self.u_bias = nn.Parameter(torch.zeros(num_heads, model_dim // num_heads))
        self.v_bias = nn.Parameter(torch.zeros(num_heads, model_dim // num_heads))
        self.r_proj = nn.Linear(model_dim, model_dim, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        seq_len = k.shape[-2]
        if seq_len > self.max_seq_len:
            raise ValueError(f"Sequence of {seq_len} frames exceeds the encoder's maximum of {self.max_seq_len}.")
        r = self.r_proj(relative_position_table(seq_len, self.r_proj.in_features, q.device).type_as(q))
        r = r.view(1, -1, self.num_heads, k.shape[-1]).transpose(1, 2)
        bd = torch.matmul(q + self.v_bias.unsqueeze(1), r.transpose(-1, -2))  # (B, H, S, 2S-1)
        b, h, s, _ = bd.shape
        bd = F.pad(bd, (1, 0)).view(b, h, 2 * s, s)[:, :, 1:, :].reshape(b, h, s, 2 * s - 1)[..., :s]
        mask = bd * (q.shape[-1] ** -0.5)
        bias = padding_bias(valid, mask.dtype)
        if bias is not None:
            mask = mask + bias
        return F.scaled_dot_product_attention(q + self.u_bias.unsqueeze(1), k, v, attn_mask=mask)


class MultiheadAttention(nn.Module):
    """``StandardMultiheadAttention``: biased q/k/v/output projections; ``sdpa`` only for relative positions."""

    def __init__(self, model_dim: int, num_heads: int, kv_dim: int | None = None,
                 sdpa: RelativePositionSDPA | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(model_dim, model_dim)
        self.k_proj = nn.Linear(kv_dim or model_dim, model_dim)
        self.v_proj = nn.Linear(kv_dim or model_dim, model_dim)
        self.sdpa = sdpa
        self.output_proj = nn.Linear(model_dim, model_dim)

    def forward(self, seqs: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q_proj(seqs).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = self.k_proj(keys).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v_proj(keys).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        if self.sdpa is not None:
            attn = self.sdpa(q, k, v, valid)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=padding_bias(valid, q.dtype))
        return self.output_proj(attn.transpose(1, 2).flatten(2, 3))


class FeedForwardNetwork(nn.Module):
    """``StandardFeedForwardNetwork``: ``output_proj(act(inner_proj(x)))``."""

    def __init__(self, model_dim: int, inner_dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.inner_proj = nn.Linear(model_dim, inner_dim)
        self.inner_activation = activation
        self.output_proj = nn.Linear(inner_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_proj(self.inner_activation(self.inner_proj(x)))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm ``StandardTransformerEncoderLayer`` (SONAR's text encoder builds its layers with ``PRE``)."""

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(model_dim)
        self.self_attn = MultiheadAttention(model_dim, num_heads)
        self.ffn_layer_norm = nn.LayerNorm(model_dim)
        self.ffn = FeedForwardNetwork(model_dim, ffn_dim, activation)

    def forward(self, seqs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        h = self.self_attn_layer_norm(seqs)
        seqs = seqs + self.self_attn(h, h, valid)
        return seqs + self.ffn(self.ffn_layer_norm(seqs))


class TransformerDecoderLayer(nn.Module):
    """Post-norm ``StandardTransformerDecoderLayer`` (SONAR's speech pooler): self, cross, FFN, each then a norm.

    The pooler decodes a single query, so the causal self-attention mask is a no-op and is left out.
    """

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(model_dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(model_dim)
        self.encoder_decoder_attn = MultiheadAttention(model_dim, num_heads)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(model_dim)
        self.ffn = FeedForwardNetwork(model_dim, ffn_dim, nn.ReLU())
        self.ffn_layer_norm = nn.LayerNorm(model_dim)

    def forward(self, seqs: torch.Tensor, encoder_output: torch.Tensor,
                encoder_valid: torch.Tensor | None = None) -> torch.Tensor:
        seqs = self.self_attn_layer_norm(seqs + self.self_attn(seqs, seqs))
        seqs = self.encoder_decoder_attn_layer_norm(
            seqs + self.encoder_decoder_attn(seqs, encoder_output, encoder_valid))
        return self.ffn_layer_norm(seqs + self.ffn(seqs))


class EmbeddingFrontend(nn.Module):
    """``TransformerEmbeddingFrontend``: ``embed(ids) * sqrt(dim)`` + sinusoids from position ``pos_offset``."""

    def __init__(self, num_embeddings: int, model_dim: int, max_seq_len: int, pos_offset: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_embeddings, model_dim)
        self.scale = math.sqrt(model_dim)
        self.max_seq_len, self.pos_offset = max_seq_len, pos_offset

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq_len = ids.shape[-1]
        if seq_len > self.max_seq_len:
            raise ValueError(f"Sequence of {seq_len} tokens exceeds the maximum of {self.max_seq_len}.")
        embeds = self.embed(ids) * self.scale
        steps = torch.arange(self.pos_offset, self.pos_offset + seq_len, device=ids.device, dtype=torch.float32)
        return (embeds.float() + sinusoidal_table(steps, embeds.shape[-1])).type_as(embeds)


class ConformerConvolution(nn.Module):
    """``ConformerConvolution`` (batch-norm variant), time-major in and out."""

    def __init__(self, model_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(model_dim, 2 * model_dim, kernel_size=1, bias=False)
        self.pointwise_conv1_activation = nn.GLU(dim=1)
        self.depthwise_conv = nn.Conv1d(model_dim, model_dim, kernel_size, padding="same", groups=model_dim,
                                        bias=False)
        self.batch_norm = nn.BatchNorm1d(model_dim)
        self.depthwise_activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(model_dim, model_dim, kernel_size=1, bias=False)

    def forward(self, seqs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:
            seqs = seqs * valid.unsqueeze(-1).to(seqs.dtype)
        x = self.pointwise_conv1_activation(self.pointwise_conv1(seqs.transpose(1, 2)))
        x = self.depthwise_activation(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    """``ConformerBlock``: half-step FFN, relative self-attention, convolution, half-step FFN, ``layer_norm``."""

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, kernel_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.ffn1_layer_norm = nn.LayerNorm(model_dim)
        self.ffn1 = FeedForwardNetwork(model_dim, ffn_dim, nn.SiLU())
        self.self_attn_layer_norm = nn.LayerNorm(model_dim)
        self.self_attn = MultiheadAttention(model_dim, num_heads,
                                            sdpa=RelativePositionSDPA(model_dim, num_heads, max_seq_len))
        self.conv_layer_norm = nn.LayerNorm(model_dim)
        self.conv = ConformerConvolution(model_dim, kernel_size)
        self.ffn2_layer_norm = nn.LayerNorm(model_dim)
        self.ffn2 = FeedForwardNetwork(model_dim, ffn_dim, nn.SiLU())
        self.layer_norm = nn.LayerNorm(model_dim)

    def forward(self, seqs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        seqs = seqs + self.ffn1(self.ffn1_layer_norm(seqs)) * 0.5
        h = self.self_attn_layer_norm(seqs)
        seqs = seqs + self.self_attn(h, h, valid)
        seqs = seqs + self.conv(self.conv_layer_norm(seqs), valid)
        seqs = seqs + self.ffn2(self.ffn2_layer_norm(seqs)) * 0.5
        return self.layer_norm(seqs)


class LayerStack(nn.Module):
    """fairseq2's ``StandardTransformerEncoder``/``Decoder`` as SONAR builds them (post-norm: no final norm)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


def init_fairseq2_style(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Seeded random values for a tiny instance (real checkpoints overwrite every one of them)."""
    for name, param in module.named_parameters():
        with torch.no_grad():
            if name.endswith("layer_norm.weight") or name.endswith("batch_norm.weight"):
                param.fill_(1.0)
            elif name.endswith("layer_norm.bias") or name.endswith("batch_norm.bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    for mod in module.modules():
        if isinstance(mod, nn.BatchNorm1d):  # non-trivial running statistics, so the tests see them used
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=generator) * 0.1)
            mod.running_var.copy_(1.0 + torch.rand(mod.running_var.shape, generator=generator))
