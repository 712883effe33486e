"""Sequence layout shared by the three families: left-padded rows, where each row's audio and text sit, and how the
audio embeddings replace their placeholder positions.

All three releases feed one item at a time; batching is ours. Rows are left-padded and every span is recorded
relative to the row's first real token, so an item alone and the same item inside a padded batch see the same
positions (and, with ``position_ids`` from the attention mask, the same logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from lalm_probe.core.data import Stimulus
from lalm_probe.core.model import Prompt
from lalm_probe.core.positions import Positions


@dataclass(frozen=True)
class RowSpans:
    """Where one row's parts sit. LM spans are ``[start, end)`` relative to ``offset`` (the left padding).

    ``audio_frames`` is the number of encoder frames that come from this row's audio (not from window padding;
    ``None`` for a text-only row); ``encoder_frames`` gives the same per encoder module when a family has several
    (SALMONN: ``speech_encoder`` and ``beats``); ``clip`` is the row's first index on the encoder's batch axis.
    ``extra`` holds family-specific LM spans (DeSTA2's ``transcription``).
    """

    offset: int
    length: int
    audio: tuple[int, int] | None = None
    text: tuple[int, int] | None = None
    audio_frames: int | None = None
    clip: int | None = None
    extra: dict[str, tuple[int, int]] = field(default_factory=dict)
    encoder_frames: dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    """What a processor builds: the model's keyword inputs and, per row, its :class:`RowSpans`."""

    inputs: dict[str, Any]
    rows: list[RowSpans]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of rows padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            ids[b, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[b, width - len(row):] = 1
    return ids, mask


def whisper_frames(samples: int, hop: int = 160, window_frames: int = 3000) -> int:
    """Whisper encoder frames covering ``samples`` of audio: mel frames ceil(samples / hop), capped at the window,
    halved by the stride-2 convolution."""
    mel = min(-(-samples // hop), window_frames)
    return (mel - 1) // 2 + 1


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (what ``generate`` also derives)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The tokens whose characters overlap ``[start, end)``, from a fast tokenizer's offset mapping."""
    hit = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
    return (hit[0], hit[-1] + 1) if hit else None


def scatter_audio(inputs_embeds: torch.Tensor, audio_embeds: torch.Tensor, start_idx: torch.Tensor,
                  token_len: torch.Tensor, batch_size: torch.Tensor) -> torch.Tensor:
    """Write clip ``i``'s first ``token_len[i]`` embeddings at ``start_idx[i]`` of the row it belongs to.

    Clips are ordered by row and ``batch_size[b]`` says how many belong to row ``b`` (Ultravox's
    ``audio_batch_size``; ``fixie-ai/ultravox`` ``ultravox_model.py`` ``_prepare_audio_embeds``). Returns a new tensor.
    """
    out = inputs_embeds.clone()
    rows = torch.repeat_interleave(torch.arange(len(batch_size), device=batch_size.device), batch_size.long())
    for clip, (row, start, n) in enumerate(zip(rows.tolist(), start_idx.tolist(), token_len.tolist())):
        out[row, start:start + n] = audio_embeds[clip, :n].to(out.dtype)
    return out


def placeholder_positions(batch: Batch) -> list[list[int]]:
    """Per row, the absolute positions the audio embeddings overwrite (for tests and span checks)."""
    out = []
    for row in batch.rows:
        out.append(list(range(row.offset + row.audio[0], row.offset + row.audio[1])) if row.audio else [])
    return out


def user_text(item: Stimulus, prompt: Prompt) -> str | None:
    """The text of the user turn, as :class:`~lalm_probe.core.audio_lm.AudioLM` builds it: after a clip the
    instruction; for a text item its text, then the instruction on a new line."""
    if item.has_audio:
        return prompt.user
    return "\n".join(t for t in (item.text, prompt.user) if t) or None


def lm_positions(row: RowSpans) -> Positions:
    """A row's positions on the LM: its spans ``audio`` and ``text``, and the family's extra spans."""
    spans = {name: span for name, span in (("audio", row.audio), ("text", row.text), *row.extra.items()) if span}
    return Positions(row.offset, row.length, spans)
