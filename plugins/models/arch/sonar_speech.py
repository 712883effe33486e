"""SONAR's speech encoders (``sonar_speech_encoder_<lang>``): w2v-BERT 2.0 Conformer + attention pooling.

Follows ``sonar/models/sonar_speech/{config,factory,model}.py`` over fairseq2 0.4's w2v-BERT ``600m`` encoder
(``models/w2vbert/_config.py``, ``models/wav2vec2/{_factory,_frontend,_feature_extractor}.py``):

- input: 80-bin Kaldi fbank, standardised per utterance (``WaveformToFbankConverter(waveform_scale=2**15,
  standardize=True)``), then stacked in pairs of frames (``Wav2Vec2FbankFeatureExtractor``, stride 2 -> 160 dims;
  an odd last frame is dropped) -> ``encoder_frontend.post_extract_layer_norm`` -> ``encoder_frontend.model_dim_proj``;
- ``encoder.layers``: 24 Conformer blocks with relative-position attention (no frontend position encoder);
- ``layer_norm``: w2v-BERT's redundant final norm, moved to the SONAR model by the release; final dropout (no-op);
- ``encoder_pooler``: one ``bos_idx`` (2) query, embedded (a 1024-row table) * sqrt(1024) + sinusoid at position 0,
  through 3 (English) or 6 (other languages) post-norm decoder layers cross-attending to the encoder output, then
  ``projection_out`` (no bias): the sentence embedding.

The fbank uses transformers' Kaldi-compatible ``SeamlessM4TFeatureExtractor`` filterbank (povey window,
pre-emphasis 0.97, DC removal, 512-point FFT, mel 20 Hz-8 kHz, log floor at float epsilon), i.e. the options
fairseq2 leaves at kaldi-native-fbank's defaults; standardisation is fairseq2's (unbiased std, no epsilon).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lalm_probe.core.errors import UserError
from torch import nn

from .sonar_checkpoint import BASE_URL, convert_speech_state, load_into, read_state_dict, speech_checkpoint_file
from .sonar_nn import (
    ConformerBlock,
    EmbeddingFrontend,
    LayerStack,
    SonarBatch,
    SonarEncoderOutput,
    SonarRow,
    TransformerDecoderLayer,
    init_fairseq2_style,
)

CONFIG_FILE = "config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SonarSpeechConfig:
    """``SonarSpeechEncoderConfig`` over w2v-BERT ``600m``; ``non_english`` by default (6 pooler layers)."""

    model_dim: int = 1024
    num_encoder_layers: int = 24
    num_encoder_attn_heads: int = 16
    ffn_inner_dim: int = 4096
    depthwise_conv_kernel_size: int = 31
    encoder_max_seq_len: int = 4096
    num_fbank_channels: int = 80
    fbank_stride: int = 2
    num_decoder_layers: int = 6
    num_decoder_attn_heads: int = 16
    decoder_ffn_inner_dim: int = 4096
    pooler_max_seq_len: int = 1024
    bos_idx: int = 2

    @classmethod
    def english(cls) -> "SonarSpeechConfig":
        return cls(num_decoder_layers=3)


class FbankStacker(nn.Module):
    """``Wav2Vec2FbankFeatureExtractor``: (B, S, 80) -> (B, S // 2, 160), lengths halved (no parameters)."""

    def __init__(self, stride: int = 2) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        b, s, c = seqs.shape
        s -= s % self.stride
        return seqs[:, :s].reshape(b, s // self.stride, c * self.stride)


class Wav2Vec2Frontend(nn.Module):
    """``encoder_frontend``: stacking, ``post_extract_layer_norm``, ``model_dim_proj`` (no position encoder)."""

    def __init__(self, config: SonarSpeechConfig) -> None:
        super().__init__()
        feature_dim = config.num_fbank_channels * config.fbank_stride
        self.feature_extractor = FbankStacker(config.fbank_stride)
        self.post_extract_layer_norm = nn.LayerNorm(feature_dim)
        self.model_dim_proj = nn.Linear(feature_dim, config.model_dim)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.model_dim_proj(self.post_extract_layer_norm(self.feature_extractor(fbank)))


class AttentionPooler(nn.Module):
    """``AttentionEncoderOutputPooler``: a one-token decoder whose output is the sentence embedding."""

    def __init__(self, config: SonarSpeechConfig) -> None:
        super().__init__()
        self.bos_idx = config.bos_idx
        self.decoder_frontend = EmbeddingFrontend(config.model_dim, config.model_dim, config.pooler_max_seq_len)
        self.decoder = LayerStack([TransformerDecoderLayer(config.model_dim, config.num_decoder_attn_heads,
                                                           config.decoder_ffn_inner_dim)
                                   for _ in range(config.num_decoder_layers)])
        self.projection_out = nn.Linear(config.model_dim, config.model_dim, bias=False)

    def forward(self, encoder_output: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        ids = torch.full((encoder_output.shape[0], 1), self.bos_idx, dtype=torch.long, device=encoder_output.device)
        seqs = self.decoder_frontend(ids)
        for layer in self.decoder.layers:
            seqs = layer(seqs, encoder_output, valid)
        return self.projection_out(seqs).squeeze(1)


class SonarSpeechEncoder(nn.Module):
    """``SonarSpeechEncoderModel``; ``forward(input_features (B, S, 80), attention_mask (B, S))``."""

    def __init__(self, config: SonarSpeechConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder_frontend = Wav2Vec2Frontend(config)
        self.encoder = LayerStack([ConformerBlock(config.model_dim, config.num_encoder_attn_heads, config.ffn_inner_dim,
                                                  config.depthwise_conv_kernel_size, config.encoder_max_seq_len)
                                   for _ in range(config.num_encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.model_dim)
        self.encoder_pooler = AttentionPooler(config)

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> SonarEncoderOutput:
        seqs = self.encoder_frontend(input_features)
        valid = None
        if attention_mask is not None and not bool(attention_mask.all()):
            lengths = attention_mask.sum(-1).clamp(max=seqs.shape[1] * self.config.fbank_stride)
            frames = lengths // self.config.fbank_stride
            valid = torch.arange(seqs.shape[1], device=seqs.device)[None, :] < frames[:, None]
        hidden = [seqs]
        for layer in self.encoder.layers:
            seqs = layer(seqs, valid)
            hidden.append(seqs)
        seqs = self.layer_norm(seqs)
        mask = torch.ones(seqs.shape[:2], dtype=torch.long, device=seqs.device) if valid is None else valid.long()
        return SonarEncoderOutput(last_hidden_state=seqs, sentence_embedding=self.encoder_pooler(seqs, valid),
                                  attention_mask=mask, hidden_states=tuple(hidden) if output_hidden_states else None)


class SonarSpeechProcessor:
    """``SpeechToEmbeddingModelPipeline``'s input side: standardised fbank per clip, zero-padded to an even length."""

    sampling_rate = 16000

    def __init__(self) -> None:
        from transformers import SeamlessM4TFeatureExtractor

        self._kaldi = SeamlessM4TFeatureExtractor()

    def fbank(self, wave: np.ndarray) -> torch.Tensor:
        """(frames, 80): Kaldi log-mel fbank of ``wave * 2**15``, standardised with ``torch.std_mean`` over time."""
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.shape[0] < 400:
            raise UserError(f"A clip of {wave.shape[0]} samples is shorter than one 25 ms fbank frame.")
        feats = torch.from_numpy(np.ascontiguousarray(self._kaldi._extract_fbank_features(wave), dtype=np.float32))
        std, mean = torch.std_mean(feats, dim=0)
        return (feats - mean) / std

    def __call__(self, clips: Sequence[np.ndarray], sampling_rate: int = 16000) -> SonarBatch:
        """Rows report their valid encoder frames (``frames // 2``) as ``length``; span ``audio`` covers them."""
        if sampling_rate != self.sampling_rate:
            raise UserError(f"SONAR speech encoders take 16 kHz audio, not {sampling_rate} Hz; resample first.")
        feats = [self.fbank(c) for c in clips]
        width = max(f.shape[0] for f in feats)
        width += width % 2  # Collater(pad_to_multiple=2)
        input_features = torch.zeros(len(feats), width, feats[0].shape[1])
        mask = torch.zeros(len(feats), width, dtype=torch.long)
        rows = []
        for b, f in enumerate(feats):
            input_features[b, : f.shape[0]], mask[b, : f.shape[0]] = f, 1
            rows.append(SonarRow(f.shape[0] // 2, {"audio": (0, f.shape[0] // 2)}))
        return SonarBatch({"input_features": input_features, "attention_mask": mask}, rows)


def infer_config(state: dict[str, torch.Tensor]) -> SonarSpeechConfig:
    """The released arch from tensor shapes (heads are model_dim / 64, as in both released archs)."""
    needed = ("encoder_frontend.model_dim_proj.weight", "encoder.layers.0.ffn1.inner_proj.weight",
              "encoder.layers.0.conv.depthwise_conv.weight", "encoder_pooler.decoder.layers.0.ffn.inner_proj.weight")
    if any(key not in state for key in needed):
        raise UserError(f"The checkpoint does not match a SONAR speech encoder (it has no {needed[0]}).")
    dim = state["encoder_frontend.model_dim_proj.weight"].shape[0]

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    return SonarSpeechConfig(
        model_dim=dim, num_encoder_layers=count("encoder.layers."), num_encoder_attn_heads=dim // 64,
        ffn_inner_dim=state["encoder.layers.0.ffn1.inner_proj.weight"].shape[0],
        depthwise_conv_kernel_size=state["encoder.layers.0.conv.depthwise_conv.weight"].shape[-1],
        num_decoder_layers=count("encoder_pooler.decoder.layers."), num_decoder_attn_heads=dim // 64,
        decoder_ffn_inner_dim=state["encoder_pooler.decoder.layers.0.ffn.inner_proj.weight"].shape[0])


def load_sonar_speech(source: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                      trust_pickle: bool = False) -> tuple[SonarSpeechEncoder, SonarSpeechProcessor]:
    """An encoder from a released ``spenc.*.pt`` file (or a directory holding one, with an optional
    ``config.json``); a card name (``sonar_speech_encoder_fra``) says which file to download."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        name = str(source)
        if name.startswith("sonar_speech_encoder_"):
            file = speech_checkpoint_file(name.removeprefix("sonar_speech_encoder_"))
            raise UserError(f"'{name}' is not downloaded; fetch {BASE_URL}{file} and pass its path.")
        raise UserError(f"SONAR speech checkpoint '{name}' does not exist; pass a spenc.*.pt file or its directory.")
    checkpoint = path
    if path.is_dir():
        found = sorted(path.glob("*.pt"))
        if len(found) != 1:
            raise UserError(f"'{path}' should hold exactly one .pt speech checkpoint, found {len(found)}.")
        checkpoint = found[0]
    state = convert_speech_state(read_state_dict(checkpoint, trust_pickle=trust_pickle))
    cfg_file = checkpoint.parent / CONFIG_FILE
    config = SonarSpeechConfig(**json.loads(cfg_file.read_text())) if cfg_file.is_file() else infer_config(state)
    with torch.device("meta"):
        model = SonarSpeechEncoder(config)
    load_into(model, state, str(checkpoint))
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return model.to(device=device, dtype=torch_dtype).eval(), SonarSpeechProcessor()


def build_tiny_sonar_speech(out_dir: str | Path, seed: int = 0, lang: str = "eng") -> Path:
    """A seeded 64-wide encoder (2 Conformer blocks, 2 pooler layers) saved as ``spenc.<lang>.pt`` + ``config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = SonarSpeechConfig(model_dim=64, num_encoder_layers=2, num_encoder_attn_heads=4, ffn_inner_dim=128,
                               num_decoder_layers=2, num_decoder_attn_heads=4, decoder_ffn_inner_dim=128)
    model = SonarSpeechEncoder(config)
    init_fairseq2_style(model, torch.Generator().manual_seed(seed))
    torch.save({"model": model.state_dict(), "model_key": "model", "fs2": True}, out / f"spenc.{lang}.pt")
    (out / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=1))
    return out
