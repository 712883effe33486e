"""SONAR's text encoder (``text_sonar_basic_encoder``): NLLB-200 dense encoder + mean pooling, fairseq2 key names.

Follows ``sonar/models/sonar_text/{config,factory,model}.py``: embeddings scaled by sqrt(1024) plus sinusoids from
position ``pad_idx + 1 = 2`` (legacy fairseq offset; ``max_seq_len`` 512 + 2), 24 pre-norm layers (ReLU FFN of 8192),
no encoder-level norm (the stack is built ``POST``) but a model ``layer_norm`` on the output, then ``MEAN`` pooling:
the sum over valid tokens times ``1 / (length + 1e-7)`` (``static_pooling``; a batch without padding uses the padded
length, as fairseq2 passes no mask then). State-dict keys: ``encoder_frontend.embed.weight``,
``encoder.layers.{i}.{self_attn_layer_norm, self_attn.{q,k,v,output}_proj, ffn_layer_norm, ffn.{inner,output}_proj}``,
``layer_norm``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from lalm_probe.core.errors import UserError
from torch import nn

from .sonar_checkpoint import BASE_URL, TEXT_CARD, TEXT_FILES, convert_text_state, load_into, read_state_dict
from .sonar_nn import (
    EmbeddingFrontend,
    LayerStack,
    SonarBatch,
    SonarEncoderOutput,
    SonarRow,
    TransformerEncoderLayer,
    init_fairseq2_style,
)
from .sonar_tokenizer import NLLB_LANGS, NllbTokenizer, tiny_spm_model

CONFIG_FILE = "config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SonarTextConfig:
    """``SonarTextEncoderConfig`` arch ``basic``; ``max_seq_len`` already includes fairseq's ``pad_idx + 1``."""

    model_dim: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_inner_dim: int = 8192
    vocab_size: int = 256206
    pad_idx: int = 1
    max_seq_len: int = 514
    langs: tuple[str, ...] = NLLB_LANGS
    default_lang: str = "eng_Latn"


class MeanPooling(nn.Module):
    """``static_pooling(..., Pooling.MEAN)``: a module of its own so the pooled embedding is a readable site."""

    def forward(self, seqs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if valid is None:
            return seqs.sum(dim=1) * (1.0 / (seqs.size(1) + 1e-7))
        summed = seqs.masked_fill(~valid.unsqueeze(-1), 0.0).sum(dim=1)
        return torch.einsum("i...,i->i...", summed, 1.0 / (valid.sum(-1).to(summed.dtype) + 1e-7))


class SonarTextEncoder(nn.Module):
    """``SonarTextTransformerEncoderModel`` with mean pooling; ``forward(input_ids, attention_mask)``."""

    def __init__(self, config: SonarTextConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder_frontend = EmbeddingFrontend(config.vocab_size, config.model_dim, config.max_seq_len,
                                                  pos_offset=config.pad_idx + 1)
        self.encoder = LayerStack([TransformerEncoderLayer(config.model_dim, config.num_heads, config.ffn_inner_dim,
                                                           nn.ReLU()) for _ in range(config.num_layers)])
        self.layer_norm = nn.LayerNorm(config.model_dim)
        self.pooling = MeanPooling()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> SonarEncoderOutput:
        valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        seqs = self.encoder_frontend(input_ids)
        hidden = [seqs]
        for layer in self.encoder.layers:
            seqs = layer(seqs, valid)
            hidden.append(seqs)
        seqs = self.layer_norm(seqs)
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device) if valid is None else \
            attention_mask.long()
        return SonarEncoderOutput(last_hidden_state=seqs, sentence_embedding=self.pooling(seqs, valid),
                                  attention_mask=mask, hidden_states=tuple(hidden) if output_hidden_states else None)


class SonarTextProcessor:
    """``TextToEmbeddingModelPipeline``'s input side: tokenise per language, cut to ``max_seq_len``, right-pad."""

    def __init__(self, tokenizer: NllbTokenizer, max_seq_len: int = 514) -> None:
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len

    def __call__(self, texts: Sequence[str], langs: str | Sequence[str] | None = None) -> SonarBatch:
        """Rows are ``[__lang__, pieces..., </s>]``; span ``text`` covers the pieces."""
        per_row = [langs] * len(texts) if langs is None or isinstance(langs, str) else list(langs)
        ids = [self.tokenizer.encode(t, lang, self.max_seq_len) for t, lang in zip(texts, per_row)]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        rows = []
        for b, row in enumerate(ids):
            input_ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
            end = len(row) - 1 if row[-1] == self.tokenizer.eos_id else len(row)
            rows.append(SonarRow(len(row), {"text": (1, end)} if end > 1 else {}))
        return SonarBatch({"input_ids": input_ids, "attention_mask": mask}, rows)


def _find(directory: Path, preferred: str, suffix: str) -> Path | None:
    if (directory / preferred).is_file():
        return directory / preferred
    found = sorted(directory.glob(f"*{suffix}"))
    return found[0] if len(found) == 1 else None


def load_sonar_text(source: str | Path = TEXT_CARD, *, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", trust_pickle: bool = False,
                    ) -> tuple[SonarTextEncoder, SonarTextProcessor]:
    """The encoder and its tokenizer from a directory holding the released ``sonar_text_encoder.pt`` and
    ``sentencepiece.source.256000.model`` (an optional ``config.json`` overrides the ``basic`` arch)."""
    path = Path(str(source)).expanduser()
    if str(source) == TEXT_CARD or not path.exists():
        raise UserError(f"SONAR text encoder '{source}' is not a local directory; download {BASE_URL}"
                        f"{TEXT_FILES['checkpoint']} and {BASE_URL}{TEXT_FILES['tokenizer']} into one directory "
                        f"and pass it.")
    directory = path if path.is_dir() else path.parent
    checkpoint = path if path.is_file() else _find(directory, TEXT_FILES["checkpoint"], ".pt")
    spm_file = _find(directory, TEXT_FILES["tokenizer"], ".model")
    if checkpoint is None or spm_file is None:
        raise UserError(f"'{directory}' needs one .pt checkpoint and one SentencePiece .model "
                        f"({TEXT_FILES['checkpoint']}, {TEXT_FILES['tokenizer']}).")
    config = SonarTextConfig()
    if (directory / CONFIG_FILE).is_file():
        fields = json.loads((directory / CONFIG_FILE).read_text())
        config = SonarTextConfig(**{**fields, "langs": tuple(fields.get("langs", NLLB_LANGS))})
    tokenizer = NllbTokenizer.from_file(spm_file, config.langs, config.default_lang)
    if len(tokenizer) != config.vocab_size:
        raise UserError(f"'{spm_file}' gives {len(tokenizer)} tokens with the card's languages but the encoder "
                        f"has {config.vocab_size} rows; tokenizer and checkpoint do not belong together.")
    with torch.device("meta"):
        model = SonarTextEncoder(config)
    load_into(model, convert_text_state(read_state_dict(checkpoint, trust_pickle=trust_pickle)), str(checkpoint))
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return model.to(device=device, dtype=torch_dtype).eval(), SonarTextProcessor(tokenizer, config.max_seq_len)


def build_tiny_sonar_text(out_dir: str | Path, seed: int = 0) -> Path:
    """A seeded 2-layer, 64-wide encoder saved as the release ships it (``.pt`` with a ``model`` dict, the
    SentencePiece model) plus ``config.json`` for the tiny dimensions and its three languages."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    langs = ("eng_Latn", "fra_Latn", "deu_Latn")
    spm_bytes = tiny_spm_model()
    config = SonarTextConfig(model_dim=64, num_layers=2, num_heads=4, ffn_inner_dim=128,
                             vocab_size=len(NllbTokenizer(spm_bytes, langs)), langs=langs)
    model = SonarTextEncoder(config)
    init_fairseq2_style(model, torch.Generator().manual_seed(seed))
    torch.save({"model": model.state_dict(), "model_key": "model", "fs2": True}, out / TEXT_FILES["checkpoint"])
    (out / TEXT_FILES["tokenizer"]).write_bytes(spm_bytes)
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1))
    return out
