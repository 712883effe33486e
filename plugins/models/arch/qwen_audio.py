"""Qwen-Audio(-Chat) v1: the QWen LM with its Whisper-style audio encoder, on transformers building blocks.

Follows ``modeling_qwen.py`` / ``configuration_qwen.py`` of the release (QwenLM/Qwen-Audio, written for transformers
4.31 and loaded there with ``trust_remote_code``). Parameter names are the released ones, so the hub safetensors load
unchanged: ``transformer.wte``, ``transformer.h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2,
mlp.c_proj}``, ``transformer.ln_f``, ``transformer.audio.*`` (see ``qwen_audio_encoder``) and ``lm_head``.

What is computed as the release does: RMSNorm in float32, rotary embeddings on the full head (``rotate_half`` on
halves, float32), dynamic NTK scaling of the rotary base chosen at the prompt pass from the prompt length and kept for
the decode steps, log-n query scaling past ``seq_length``, SwiGLU-like MLP ``c_proj(w1(x) * silu(w2(x)))``, and the
audio encoder's outputs (with the learned bos/eos vectors) written over each ``<audio> ... </audio>`` span at the
prompt pass.

What differs, on purpose: rotary and log-n positions come from ``position_ids`` (by default ``cumsum(mask) - 1``)
instead of the index in the padded batch, and the KV cache is a transformers ``Cache``. For an unpadded row both give
the release's numbers; for a left-padded row ours equal the row alone (the release shifts padded rows' positions).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .qwen_audio_encoder import AudioEncoder, init_audio_module

AUDIO_CONFIG_7B = dict(n_mels=80, n_ctx=1500, n_state=1280, n_head=20, n_layer=32, output_dim=4096, avg_pool=True,
                       add_audio_bos_eos_token=True, audio_start_id=155163)


class QWenConfig(PreTrainedConfig):
    """``configuration_qwen.py``'s fields; defaults are Qwen-Audio-Chat's released ``config.json``."""

    model_type = "qwen"

    vocab_size: int = 155947
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    kv_channels: int = 128
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    intermediate_size: int = 22016
    no_bias: bool = True
    seq_length: int = 2048
    tie_word_embeddings: bool = False
    audio: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.audio is None:
            self.audio = dict(AUDIO_CONFIG_7B)
        super().__post_init__(**kwargs)

    @property
    def audio_start_id(self) -> int:
        return int(self.audio["audio_start_id"])


class RMSNorm(nn.Module):
    """``RMSNorm`` of the release: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def ntk_alpha(true_len: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``get_ntk_alpha``: ``2**ceil(log2(len / seq_length) + 1) - 1``, at least 1 (so 1 up to ``seq_length``)."""
    ctx = torch.log2(true_len.double() / seq_length) + 1
    return torch.clamp(2 ** torch.ceil(ctx) - 1, min=1).float()


def rotary_cos_sin(position_ids: torch.Tensor, alpha: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, ...]:
    """cos/sin of shape (B, T, 1, dim) in float32, as ``RotaryEmbedding`` builds them, per row's NTK ``alpha``."""
    exponent = torch.arange(0, dim, 2, device=position_ids.device).float() / dim
    scaled_base = base * alpha.to(position_ids.device)[:, None] ** (dim / (dim - 2))
    inv_freq = 1.0 / (scaled_base ** exponent[None, :])  # (B, dim/2)
    freqs = position_ids.float()[..., None] * inv_freq[:, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` (non-flash path): float32 ``t*cos + rotate_half(t)*sin`` on (B, T, H, D)."""
    tf = t.float()
    x1, x2 = tf.chunk(2, dim=-1)
    return (tf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(t)


class QWenAttention(nn.Module):
    """Fused ``c_attn`` (q, k, v with bias) and ``c_proj`` (no bias); causal SDPA over the cache."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.seq_length = config.seq_length
        self.use_logn_attn = config.use_logn_attn
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection)
        self.c_proj = nn.Linear(config.hidden_size, projection, bias=not config.no_bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor], position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(self.num_heads * self.head_dim, dim=2)
        q, k, v = (x.view(b, t, self.num_heads, self.head_dim) for x in (q, k, v))
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if self.use_logn_attn and not self.training:
            # logn_tensor[i-1] = log_{seq_length}(i) for i > seq_length, else 1 (i = position + 1)
            pos1 = (position_ids + 1).float()
            logn = torch.where(pos1 > self.seq_length, torch.log(pos1) / math.log(self.seq_length),
                               torch.ones_like(pos1))
            q = q * logn[:, :, None, None].type_as(q)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, -1))


class QWenMLP(nn.Module):
    """``c_proj(w1(x) * silu(w2(x)))`` with half the configured intermediate size, as released."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    """Pre-norm block; returns the residual stream as a tensor (readable and editable as the layer's output)."""

    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor], position_ids: torch.Tensor,
                cache: Cache | None = None) -> torch.Tensor:
        h = hidden_states + self.attn(hidden_states=self.ln_1(hidden_states), attention_mask=attention_mask,
                                      rotary=rotary, position_ids=position_ids, cache=cache)
        return h + self.mlp(self.ln_2(h))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["QWenBlock", "ResidualAttentionBlock"]
    # a fixed sinusoid table: refilled by _init_weights when a checkpoint does not carry it
    _keys_to_ignore_on_load_missing = [r"transformer\.audio\.positional_embedding"]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, QWenMLP):  # the release scales c_proj's std by sqrt(2 * layers)
            for lin in (module.w1, module.w2):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, QWenAttention):
            nn.init.normal_(module.c_attn.weight, std=std)
            nn.init.zeros_(module.c_attn.bias)
            nn.init.normal_(module.c_proj.weight, std=std / math.sqrt(2 * self.config.num_hidden_layers))
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.LayerNorm, AudioEncoder)):
            init_audio_module(module, std)


class QWenModel(QWenPreTrainedModel):
    """``transformer``: embeddings, audio encoder, blocks ``h``, final norm ``ln_f``."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_dim = int(config.kv_channels * config.rotary_pct)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.audio = AudioEncoder(**config.audio)
        self._ntk_alpha: torch.Tensor | None = None  # chosen at the prompt pass, kept for the decode steps
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def _audio_spans(self, input_ids: torch.Tensor) -> list[tuple[int, int, int]]:
        """(row, first, last) of each ``<audio> ... </audio>`` span in row-major order, as the release finds them."""
        start = self.config.audio_start_id
        bos, eos = torch.where(input_ids == start), torch.where(input_ids == start + 1)
        if bos[0].numel() != eos[0].numel() or not bool((bos[0] == eos[0]).all()):
            raise ValueError("Every <audio> token needs a matching </audio> token in the same row.")
        return list(zip(bos[0].tolist(), bos[1].tolist(), eos[1].tolist()))

    def _insert_audio(self, hidden: torch.Tensor, input_ids: torch.Tensor, input_audios: torch.Tensor,
                      input_audio_lengths: torch.Tensor) -> torch.Tensor:
        spans = self._audio_spans(input_ids)
        if len(spans) != input_audios.shape[0]:
            raise ValueError(f"{len(spans)} <audio> spans in input_ids but {input_audios.shape[0]} audio clips.")
        features = self.audio(input_audios, input_audio_lengths)
        pieces = self.audio.span_embeddings(features, input_audio_lengths)
        hidden = hidden.clone()
        for (row, a, b), piece in zip(spans, pieces):
            if piece.shape[0] != b - a + 1:
                raise ValueError(f"Audio span of {b - a + 1} positions but the clip gives {piece.shape[0]} vectors.")
            hidden[row, a: b + 1] = piece.to(hidden.dtype)
        return hidden

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, input_audios: torch.Tensor | None = None,
                input_audio_lengths: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, **_: Any) -> BaseModelOutputWithPast:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = hidden.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=hidden.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        if past == 0 or self._ntk_alpha is None or self._ntk_alpha.shape[0] != b:
            use_ntk = self.config.use_dynamic_ntk and not self.training
            true_len = attention_mask.sum(-1) if use_ntk else torch.full((b,), 1, device=hidden.device)
            self._ntk_alpha = ntk_alpha(true_len, self.config.seq_length)
        rotary = rotary_cos_sin(position_ids, self._ntk_alpha, self.rotary_dim, self.config.rotary_emb_base)
        hidden = self.drop(hidden)
        if past == 0 and input_audios is not None and input_ids is not None:
            hidden = self._insert_audio(hidden, input_ids, input_audios, input_audio_lengths)
        mask = _causal_padding_mask(attention_mask, t, past, hidden.dtype)
        all_hidden: tuple[torch.Tensor, ...] = ()
        for block in self.h:
            if output_hidden_states:
                all_hidden += (hidden,)
            hidden = block(hidden, attention_mask=mask, rotary=rotary, position_ids=position_ids,
                           cache=cache if use_cache else None)
        hidden = self.ln_f(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache if use_cache else None,
                                       hidden_states=all_hidden or None)


def _causal_padding_mask(attention_mask: torch.Tensor, q_len: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, q, k) mask: query ``past + i`` sees valid keys up to itself (finfo.min elsewhere)."""
    k_len = attention_mask.shape[-1]
    q_pos = torch.arange(past, past + q_len, device=attention_mask.device)[:, None]
    allowed = (torch.arange(k_len, device=attention_mask.device)[None, :] <= q_pos)[None, None]
    allowed = allowed & attention_mask.bool()[:, None, None, :]
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    """``QWenLMHeadModel``: ``transformer`` + ``lm_head``; greedy ``generate`` through ``GenerationMixin``."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                input_audios: torch.Tensor | None = None, input_audio_lengths: torch.Tensor | None = None,
                audio_info: dict | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits for ``input_ids``; audio comes as ``input_audios``/``input_audio_lengths`` or the release's
        ``audio_info`` dict, and is encoded only at the prompt pass (empty cache)."""
        if audio_info is not None and input_audios is None:
            input_audios, input_audio_lengths = audio_info["input_audios"], audio_info["input_audio_lengths"]
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                               input_audios=input_audios, input_audio_lengths=input_audio_lengths,
                               use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=out.cache, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any, **kwargs: Any) -> dict:
        """As ``GenerationMixin``'s, but audio goes in at the first pass only (the release's ``past is None``)."""
        first = kwargs.get("is_first_iteration", False)
        audio = {key: kwargs.pop(key, None) for key in ("input_audios", "input_audio_lengths", "audio_info")}
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if first:
            inputs.update({k: v for k, v in audio.items() if v is not None})
        return inputs
