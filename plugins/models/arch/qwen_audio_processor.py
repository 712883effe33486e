"""Qwen-Audio-Chat's prompt and audio inputs: ChatML ``make_context``, the ``<audio>`` markup, log-mel features.

Follows ``qwen_generation_utils.make_context`` (chat_format ``chatml``, system "You are a helpful assistant.",
``max_window_size`` 6144), ``QWenTokenizer.from_list_format`` (``Audio 1:<audio>path</audio>\\n`` before the text) and
``QWenTokenizer.process_audio`` (30 s log-mel, span = tokens + 2) of the release. Audio arrives as 16 kHz arrays in
order of appearance instead of paths the tokenizer opens with ffmpeg; the path text between the tags never reaches
the model (the rewrite replaces it), so any name gives the same ids.

Each row of a batch reports where things sit (relative to its first valid token, so independent of left padding):
every ``<audio> ... </audio>`` span (the positions the encoder output overwrites, bos and eos included), the user's
text, and the clip indices into ``input_audios``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .qwen_audio_encoder import audio_token_count, librosa_mel_filters, log_mel_spectrogram, pad_or_trim
from .qwen_audio_tokenizer import AUDIO_END, AUDIO_START, VOCAB_FILE, QwenTokenizer, read_tiktoken, write_tiktoken

SYSTEM = "You are a helpful assistant."
MAX_WINDOW = 6144
MEL_FILE = "mel_filters.npz"


@dataclass
class Context:
    """One prompt as ``make_context`` builds it, plus where the current user content sits in ``ids``."""

    raw_text: str
    ids: list[int]
    content: tuple[int, int]  # [start, end) of the current query's content tokens
    clips: list[int]  # which of the given clips appear (a history turn past the window drops its clips)


@dataclass
class QwenAudioRow:
    """Where one row's parts sit, relative to its first valid token (``offset`` = left padding)."""

    offset: int
    length: int
    audio_spans: list[tuple[int, int]] = field(default_factory=list)
    text_span: tuple[int, int] | None = None
    clips: list[int] = field(default_factory=list)  # indices into input_audios, in order of appearance
    clip_frames: list[int] = field(default_factory=list)  # valid audio-encoder frames per clip (before pooling)


@dataclass
class QwenAudioBatch:
    """Model inputs (``input_ids``, ``attention_mask``, ``position_ids``, ``input_audios``,
    ``input_audio_lengths``) and per-row layout."""

    inputs: dict[str, torch.Tensor]
    rows: list[QwenAudioRow]
    raw_texts: list[str]


def list_format_query(num_audios: int, text: str | None, names: Sequence[str] | None = None) -> str:
    """``from_list_format([{'audio': ...}, ..., {'text': text}])``: ``Audio k:<audio>name</audio>\\n`` then text."""
    names = list(names) if names is not None else [f"audio{k + 1}.wav" for k in range(num_audios)]
    parts = [f"Audio {k + 1}:{AUDIO_START}{name}{AUDIO_END}\n" for k, name in enumerate(names)]
    return "".join(parts) + (text or "")


class QwenAudioProcessor:
    """Tokenizer + mel filters; builds batches the way ``model.chat`` builds one query."""

    def __init__(self, tokenizer: QwenTokenizer, mel_filters: np.ndarray | None = None) -> None:
        self.tokenizer = tokenizer
        self.mel_filters = librosa_mel_filters(80) if mel_filters is None else mel_filters.astype(np.float32)
        self.sampling_rate = 16000

    # ---- files --------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "QwenAudioProcessor":
        """Read ``qwen.tiktoken`` (required) and ``mel_filters.npz`` (optional: librosa computes the same table)."""
        directory = Path(directory)
        filters = None
        if (directory / MEL_FILE).is_file():
            with np.load(directory / MEL_FILE) as f:
                filters = f["mel_80"]
        return cls(QwenTokenizer(read_tiktoken(directory / VOCAB_FILE)), filters)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the release's tokenizer files (``qwen.tiktoken``, ``tokenizer_config.json``, ``mel_filters.npz``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_tiktoken(self.tokenizer.mergeable_ranks, directory / VOCAB_FILE)
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}, indent=2))
        np.savez_compressed(directory / MEL_FILE, mel_80=self.mel_filters)

    # ---- audio --------------------------------------------------------------------------------------
    def audio_features(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``process_audio`` on arrays: (N, 80, 3000) mels, (N, 2) [frames after CNN, tokens], span lengths."""
        mels, lengths, spans = [], [], []
        for clip in clips:
            clip = np.asarray(clip, dtype=np.float32).reshape(-1)
            t_cnn, n_tokens = audio_token_count(clip.shape[0])
            mels.append(log_mel_spectrogram(pad_or_trim(clip), self.mel_filters))
            lengths.append([t_cnn, n_tokens])
            spans.append(n_tokens + 2)
        return torch.stack(mels), torch.tensor(lengths, dtype=torch.int32), spans

    # ---- prompt -------------------------------------------------------------------------------------
    def make_context(self, query: str, spans: Sequence[int] = (), history: Sequence[tuple[str, str | None]] = (),
                     system: str = SYSTEM, assistant_prefix: str | None = None,
                     max_window_size: int = MAX_WINDOW) -> Context:
        """``make_context`` (chatml). ``spans``: audio span lengths in order of appearance (history first).

        ``assistant_prefix`` (not in the release) continues the assistant turn with the given text, for prompts
        that start the answer (e.g. "The speaker's gender is").
        """
        tok = self.tokenizer
        nl = tok.encode("\n")
        queue = list(enumerate(spans))

        def take(text: str) -> list[tuple[int, int]]:
            n = text.count(AUDIO_START)
            taken, queue[:n] = queue[:n], []
            return taken

        def turn(role: str, content: str, content_spans: list[tuple[int, int]]) -> list[int]:
            allowed = tok.audio_specials
            return ([tok.im_start_id] + tok.encode(role, allowed) + nl
                    + tok.encode(content, allowed, [n for _, n in content_spans]) + [tok.im_end_id])

        system_spans = take(system)
        system_tokens = turn("system", system, system_spans)
        turns = [(q, take(q), r, take(r) if r is not None else []) for q, r in history]
        context: list[int] = []
        raw, kept = "", []
        for q, q_spans, r, r_spans in reversed(turns):
            nxt = nl + turn("user", q, q_spans) + nl
            chat = f"\n<|im_start|>user\n{q}<|im_end|>\n"
            if r is not None:
                nxt += turn("assistant", r, r_spans)
                chat += f"<|im_start|>assistant\n{r}<|im_end|>"
            if len(system_tokens) + len(nxt) + len(context) >= max_window_size:
                break
            context, raw, kept = nxt + context, chat + raw, q_spans + r_spans + kept
        ids = system_tokens + context + nl + [tok.im_start_id] + tok.encode("user", tok.audio_specials) + nl
        start = len(ids)
        query_spans = take(query)
        ids += tok.encode(query, tok.audio_specials, [n for _, n in query_spans])
        end = len(ids)
        ids += [tok.im_end_id] + nl + [tok.im_start_id] + tok.encode("assistant") + nl
        raw = (f"<|im_start|>system\n{system}<|im_end|>{raw}\n<|im_start|>user\n{query}<|im_end|>\n"
               f"<|im_start|>assistant\n")
        if assistant_prefix:
            ids += tok.encode(assistant_prefix)
            raw += assistant_prefix
        return Context(raw, ids, (start, end), [i for i, _ in system_spans + kept + query_spans])

    def _text_span(self, ids: list[int], content: tuple[int, int]) -> tuple[int, int] | None:
        """The user's text: the content after its last ``</audio>``, leading newline tokens skipped."""
        start, end = content
        tail = [i for i in range(start, end) if ids[i] == self.tokenizer.audio_end_id]
        if tail:
            start = tail[-1] + 1
        newline = set(self.tokenizer.encode("\n"))
        while start < end and ids[start] in newline:
            start += 1
        return (start, end) if end > start else None

    # ---- batch --------------------------------------------------------------------------------------
    def __call__(self, queries: Sequence[str], audios: Sequence[Sequence[np.ndarray]] | None = None, *,
                 system: str = SYSTEM, assistant_prefixes: Sequence[str | None] | None = None,
                 histories: Sequence[Sequence[tuple[str, str | None]]] | None = None) -> QwenAudioBatch:
        """Left-padded batch of ``make_context`` prompts; ``audios[b]`` are row b's clips in order of appearance."""
        audios = audios if audios is not None else [[] for _ in queries]
        flat = [clip for row in audios for clip in row]
        feats = self.audio_features(flat) if flat else None
        contexts, used, next_clip = [], [], 0
        for b, query in enumerate(queries):
            n = len(audios[b])
            row_spans = feats[2][next_clip: next_clip + n] if feats else []
            contexts.append(self.make_context(
                query, row_spans, history=histories[b] if histories else (), system=system,
                assistant_prefix=assistant_prefixes[b] if assistant_prefixes else None))
            used.append([next_clip + i for i in contexts[-1].clips])
            next_clip += n
        order = [c for row in used for c in row]  # clips that reach the prompt, in row-major order
        clip_ids = [[order.index(c) for c in row] for row in used]
        width = max(len(c.ids) for c in contexts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        rows = []
        for b, ctx in enumerate(contexts):
            offset = width - len(ctx.ids)
            input_ids[b, offset:] = torch.tensor(ctx.ids)
            mask[b, offset:] = 1
            starts = [i for i, t in enumerate(ctx.ids) if t == self.tokenizer.audio_start_id]
            spans = [(s, ctx.ids.index(self.tokenizer.audio_end_id, s) + 1) for s in starts]
            frames = [int(feats[1][order[c], 0]) for c in clip_ids[b]]
            rows.append(QwenAudioRow(offset, len(ctx.ids), spans, self._text_span(ctx.ids, ctx.content),
                                     clip_ids[b], frames))
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask,
                                  "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        if order:
            inputs["input_audios"], inputs["input_audio_lengths"] = feats[0][order], feats[1][order]
        return QwenAudioBatch(inputs, rows, [c.raw_text for c in contexts])
