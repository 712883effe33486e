"""Helpers a model plugin uses to say where each row sits in a padded batch.

Every plugin reports, per row and per stack, the offset and length of the row's valid positions and its named spans
(:class:`Positions`). These helpers derive them from what processors return, for either padding side, so plugins
do not count by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Positions:
    """How one row sits on one stack's sequence axis: where its valid part starts, how long it is, named spans.

    Spans are ``[start, end)`` relative to ``offset``, so they do not depend on how the batch was padded.
    """

    offset: int
    length: int
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    row: int | None = None  # index on this stack's batch axis when it differs from the row's (e.g. audio clips)


def valid_ranges(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(offset, length)`` of each row's valid positions in a ``(batch, time)`` attention mask.

    Works for left and right padding (the valid positions of a row are contiguous either way).
    """
    out = []
    for row in mask.bool().tolist():
        length = sum(row)
        offset = row.index(True) if length else 0
        out.append((offset, length))
    return out


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over valid positions only, so a left-padded row sees the positions it has alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def token_run(ids: Sequence[int], token: int) -> tuple[int, int] | None:
    """``[start, end)`` of the positions holding ``token`` (an audio placeholder run), or None when absent.

    The run must be contiguous: a placeholder split by other tokens would make a span that is not the audio.
    """
    where = [i for i, t in enumerate(ids) if t == token]
    if not where:
        return None
    if where[-1] - where[0] + 1 != len(where):
        raise ValueError(f"token {token} does not form one contiguous run")
    return where[0], where[-1] + 1


def find_tokens(ids: Sequence[int], part: Sequence[int], end: int | None = None) -> tuple[int, int] | None:
    """``[start, end)`` of the last occurrence of the token sequence ``part`` in ``ids[:end]``, or None."""
    n = len(part)
    stop = len(ids) if end is None else end
    if n == 0:
        return None
    for start in range(stop - n, -1, -1):
        if list(ids[start:start + n]) == list(part):
            return start, start + n
    return None


def conv_length(frames: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> int:
    """Output length of a 1-D convolution: Whisper's stride-2 conv turns mel frames into encoder positions."""
    return (frames + 2 * padding - kernel) // stride + 1


def pool_length(frames: int, kernel: int = 2, stride: int = 2) -> int:
    """Output length of a 1-D pooling without padding (Qwen2-Audio's average pooler after the encoder)."""
    return (frames - kernel) // stride + 1
