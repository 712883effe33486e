"""Qwen-Audio-Chat (v1, ``Qwen/Qwen-Audio-Chat``): a Whisper-style audio encoder and the QWen LM, written here on
torch/transformers parts (:mod:`.arch.qwen_audio`) with the release's names, so its safetensors load as they are.

Sources: the hub id or a local copy of the release (``config.json``, safetensors, ``qwen.tiktoken``,
``mel_filters.npz``), or ``tiny`` (:func:`~.arch.qwen_audio_load.build_tiny_qwen_audio_chat`). ``trust_remote_code``
is not offered: the release's ``modeling_qwen.py`` was written for transformers 4.31 (tuple KV caches, the old
``PreTrainedModel`` API) and does not run on transformers 5.

The prompt is ``make_context``'s ChatML with the clip as ``Audio 1:<audio>…</audio>\\n`` before the instruction
(``from_list_format``). The ``audio`` span is the ``[[[AUDIO:modality]]]`` placeholders between the tags (the
encoder's pooled outputs land there; the learned bos/eos vectors land on the tags themselves); ``text`` is the user's
text after the audio. The LM's attention has no separate q/k/v modules: the fused projection is ``attn_qkv`` (3x the
width: q, k, v in that order). Its MLP is ``c_proj(w1(x) * silu(w2(x)))``: ``w2`` is the gate, ``w1`` the up
projection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lalm_probe.core.data import Stimulus
from lalm_probe.core.model import ModelPlugin, Prepared, Prompt
from lalm_probe.core.positions import Positions
from lalm_probe.core.registry import hookimpl
from lalm_probe.core.stacks import Stack
from lalm_probe.core.templates import bart_layer, decoder_layer
from lalm_probe.core.vocab import Component
from lalm_probe.plugins.models.arch.layout import user_text
from lalm_probe.plugins.models.arch.qwen_audio_encoder import CHUNK_SECONDS
from lalm_probe.plugins.models.arch.qwen_audio_load import (
    DEFAULT_HUB_ID,
    build_tiny_qwen_audio_chat,
    load_qwen_audio_chat,
)
from lalm_probe.plugins.models.arch.qwen_audio_processor import list_format_query
from lalm_probe.plugins.models.arch.qwen_audio_tokenizer import AUDIO_PAD

_LAYER = decoder_layer(attn="attn", attn_norm="ln_1", mlp_norm="ln_2", o="c_proj", gate="w2", up="w1", down="c_proj")
QWEN_BLOCK = {**{k: v for k, v in _LAYER.items() if k not in ("attn_q", "attn_k", "attn_v")},
              "attn_qkv": Component("attn.c_attn")}  # the fused q, k, v projection
AUDIO_BLOCK = bart_layer(attn="attn", attn_norm="attn_ln", q="query", k="key", v="value", o="out", mlp_norm="mlp_ln",
                         fc1="mlp.0", fc2="mlp.2", mlp="mlp")


def build_tiny(out_dir: Path) -> None:
    build_tiny_qwen_audio_chat(out_dir)


class QwenAudioChat(ModelPlugin):
    name = "qwen-audio-chat"
    description = "Qwen-Audio-Chat (v1): Whisper-style audio encoder + QWen LM (rebuilt, no remote code)"
    default_checkpoint = DEFAULT_HUB_ID
    hub_ids = (DEFAULT_HUB_ID,)
    tiny = build_tiny
    lens_stack = "lm"
    audio_token = AUDIO_PAD
    stacks = (
        # After its blocks the encoder average-pools time by 2, then norms and projects into the LM: those extras
        # are read on the pooled positions, one per audio placeholder.
        Stack("audio_encoder", layers=("transformer.audio.blocks",), components=AUDIO_BLOCK,
              extras={"norm": Component("transformer.audio.ln_post", positions="audio_pooled"),
                      "projector": Component("transformer.audio.proj", positions="audio_pooled")}),
        Stack("lm", layers=("transformer.h",), runs="per_step", components=QWEN_BLOCK, final_norm=("transformer.ln_f",),
              unembed=("lm_head",), hidden_states="hidden_states"),
    )

    @classmethod
    def load_weights(cls, source: str | Path, *, device: str, dtype: str,
                     device_map: str | None) -> tuple[torch.nn.Module, Any]:
        return load_qwen_audio_chat(source, dtype=dtype, device=device, device_map=device_map)

    def max_seconds(self) -> float:
        return CHUNK_SECONDS  # the release pads or trims every clip to 30 s of log-mel

    def prepare(self, items: Sequence[Stimulus], audio: Sequence[np.ndarray | None],
                prompts: Sequence[Prompt]) -> Prepared:
        queries = [list_format_query(int(it.has_audio), user_text(it, p)) for it, p in zip(items, prompts)]
        batch = self.processor(queries, [[a] if a is not None else [] for a in audio],
                               assistant_prefixes=[p.assistant_prefix for p in prompts])
        rows = []
        for row in batch.rows:
            spans = {"text": row.text_span} if row.text_span else {}
            out: dict[str, Positions] = {}
            if row.clips:
                ((start, end),), (clip,), (frames,) = row.audio_spans, row.clips, row.clip_frames
                spans["audio"] = (start + 1, end - 1)  # the placeholders between <audio> and </audio>
                out["audio_encoder"] = Positions(0, frames, row=clip)
                out["audio_pooled"] = Positions(0, end - start - 2, row=clip)
            out["lm"] = Positions(row.offset, row.length, spans)
            rows.append(out)
        return Prepared(batch.inputs, rows)


@hookimpl
def lalm_probe_models() -> list[type]:
    return [QwenAudioChat]
