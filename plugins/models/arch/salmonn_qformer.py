"""SALMONN's window-level Q-Former, assembled from transformers' BERT parts with the release's module names.

``bytedance/SALMONN`` ``models/salmonn.py`` ``init_speech_Qformer`` builds the BLIP-2 ``BertLMHeadModel``
(``models/Qformer.py``) from ``bert-base-uncased`` with 2 layers, cross-attention in every layer over
``encoder_width`` = Whisper width + BEATs width, one query token, and then deletes what queries never use (word and
position embeddings, the text feed-forward ``intermediate``/``output``, the LM head). What is left: the embedding
``LayerNorm`` applied to the query, and per layer ``attention`` (self), ``crossattention`` (keys/values from the
audio window) and the query feed-forward ``intermediate_query``/``output_query``. ``transformers.BertModel`` with
``add_cross_attention`` has neither the ``*_query`` names nor a cross-attention wider than the hidden size, so the
layer is composed here from ``BertAttention``, ``BertIntermediate`` and ``BertOutput``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput


def qformer_config(num_hidden_layers: int = 2, hidden_size: int = 768, num_attention_heads: int = 12,
                   intermediate_size: int = 3072) -> BertConfig:
    """``bert-base-uncased`` (BertConfig's defaults) with the SALMONN overrides; eager attention, no mask."""
    cfg = BertConfig(num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                     num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                     is_decoder=True, add_cross_attention=True)
    cfg._attn_implementation = "eager"
    return cfg


class QFormerEmbeddings(nn.Module):
    """What remains of ``BertEmbeddings``: the ``LayerNorm`` (and the ``position_ids`` buffer the checkpoint holds)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)))

    def forward(self, query_embeds: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(query_embeds))


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention into the window, query feed-forward."""

    def __init__(self, cfg: BertConfig, encoder_width: int) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.attention.self.is_causal = False  # BLIP-2 queries attend to each other freely
        self.crossattention = BertAttention(cfg, is_cross_attention=True)
        heads = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
        self.crossattention.self.key = nn.Linear(encoder_width, heads)
        self.crossattention.self.value = nn.Linear(encoder_width, heads)
        self.intermediate_query = BertIntermediate(cfg)
        self.output_query = BertOutput(cfg)

    def forward(self, hidden: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden)[0]
        hidden = self.crossattention(hidden, encoder_hidden_states=encoder_hidden_states)[0]
        return self.output_query(self.intermediate_query(hidden), hidden)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: BertConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, encoder_width) for _ in range(cfg.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, encoder_hidden_states)
        return hidden


class QFormerBert(nn.Module):
    """``speech_Qformer.bert``: ``embeddings`` then ``encoder``; queries in, query states out."""

    def __init__(self, cfg: BertConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = QFormerEmbeddings(cfg)
        self.encoder = QFormerEncoder(cfg, encoder_width)

    def forward(self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(query_embeds), encoder_hidden_states)


class SpeechQFormer(nn.Module):
    """``speech_Qformer`` (the LM head the release deletes is not built)."""

    def __init__(self, cfg: BertConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = cfg
        self.bert = QFormerBert(cfg, encoder_width)

    def forward(self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bert(query_embeds, encoder_hidden_states)
