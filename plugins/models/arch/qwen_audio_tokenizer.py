"""Qwen-Audio's tiktoken tokenizer, rebuilt from ``qwen.tiktoken`` without the remote ``QWenTokenizer`` class.

Follows ``tokenization_qwen.py`` of the release: the same split pattern, the same special-token list in the same order
(ids start right after the BPE ranks: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, 205 ``<|extra_i|>``, then
the audio tags ending with ``<audio>`` and ``</audio>``), NFC normalisation, and the ``<audio>...</audio>`` rewrite that
turns a tagged path into ``<audio>`` + ``[[[AUDIO:modality]]]`` x (span - 2) + ``</audio>``. With the released 151,643
ranks this puts ``<audio>`` at 155163 and ``</audio>`` at 155164, the ids in ``config.json``.
"""

from __future__ import annotations

import base64
import unicodedata
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Sequence

PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
           r"""\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_START, AUDIO_END, AUDIO_PAD = "<audio>", "</audio>", "[[[AUDIO:modality]]]"
LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")
VOCAB_FILE = "qwen.tiktoken"


def audio_special_tokens() -> tuple[str, ...]:
    """``QWenTokenizer.AUDIO_ST``, in the release's order (the order fixes every audio token's id)."""
    return (
        AUDIO_PAD, "<|startoftranscript|>", "<|startofanalysis|>",
        "<|translate|>", "<|transcribe|>", "<|caption|>", "<|keyword|>",
        "<|unknown|>", *[f"<|{lang}|>" for lang in LANGUAGES], "<|zh_tr|>",
        "<|notimestamps|>", "<|sil|>", "<|timestamps|>", *[f"<|{i * 0.01:.2f}|>" for i in range(3001)],
        "<|caption_audiocaps|>", "<|caption_clotho|>", "<|audioset_ontology|>", "<|caption_plain|>", "<|itn|>",
        "<|wo_itn|>", "<|startofentityvalue|>", "<|endofentityvalue|>", "<|startofentitytype|>",
        "<|endofentitytype|>", "<|named_entity_recognition|>", "<|audio_grounding|>", "<|startofword|>",
        "<|endofword|>", "<|delim|>", "<|emotion_recognition|>", "<|music_description|>", "<|note_analysis|>",
        "<|pitch|>", *[f"<|midi_pitch_{i}|>" for i in range(128)], "<|velocity|>",
        *[f"<|midi_velocity_{i}|>" for i in range(128)], "<|sonic|>", "<|instrument|>", "<|speaker_meta|>",
        "<|song_meta|>", "<|question|>", "<|answer|>", "<|choice|>", "<|scene|>", "<|event|>",
        "<|vocal_classification|>", "<|speech_understanding|>", "<|scenario|>", "<|action|>", "<|entities|>",
        "<|speech_edit|>", AUDIO_START, AUDIO_END,
    )


def special_tokens() -> tuple[str, ...]:
    """All special tokens after the BPE ranks: ChatML, 205 extras, audio tags."""
    return (ENDOFTEXT, IM_START, IM_END, *[f"<|extra_{i}|>" for i in range(205)], *audio_special_tokens())


def read_tiktoken(path: str | Path) -> dict[bytes, int]:
    """``_load_tiktoken_bpe``: one ``base64(token) rank`` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str | Path) -> None:
    """``save_vocabulary``: the inverse of :func:`read_tiktoken`."""
    lines = [base64.b64encode(tok).decode("utf8") + " " + str(rank) for tok, rank in ranks.items()]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf8")


class QwenTokenizer:
    """The released tokenizer's behaviour on ids: encode, the audio-span rewrite, decode, id lookups."""

    def __init__(self, mergeable_ranks: dict[bytes, int], errors: str = "replace") -> None:
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.errors = errors
        self.special_tokens = {tok: i for i, tok in enumerate(special_tokens(), start=len(mergeable_ranks))}
        self.audio_specials = frozenset(audio_special_tokens())
        self.encoding = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.decoder: dict[int, bytes | str] = {v: k for k, v in mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id, self.im_end_id = self.special_tokens[IM_START], self.special_tokens[IM_END]
        self.audio_start_id, self.audio_end_id = self.special_tokens[AUDIO_START], self.special_tokens[AUDIO_END]
        self.audio_pad_id = self.special_tokens[AUDIO_PAD]

    @classmethod
    def from_file(cls, path: str | Path) -> "QwenTokenizer":
        return cls(read_tiktoken(path))

    # ---- encoding ---------------------------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AbstractSet[str] | str = "all",
               audio_spans: Sequence[int] = ()) -> list[int]:
        """``tokenizer.encode(text, allowed_special=..., audio_info=...)``: ids, with each tagged audio rewritten.

        ``audio_spans`` are ``audio_span_tokens`` of ``process_audio``: one span length per ``<audio>`` in ``text``.
        """
        text = unicodedata.normalize("NFC", text)
        ids = self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())
        return self._rewrite_audio(ids, list(audio_spans))

    def _rewrite_audio(self, ids: list[int], spans: list[int]) -> list[int]:
        """``_replace_closed_tag`` with ``_encode_audiourl``: the tokens between the tags become placeholders."""
        out: list[int] = []
        i = clip = 0
        while i < len(ids):
            if ids[i] != self.audio_start_id:
                out.append(ids[i])
                i += 1
                continue
            try:
                end = ids.index(self.audio_end_id, i)
            except ValueError:
                raise ValueError("Unclosed <audio> tag in the prompt.") from None
            if clip >= len(spans):
                raise ValueError("More <audio> tags in the prompt than audio clips given.")
            out += [self.audio_start_id] + [self.audio_pad_id] * (spans[clip] - 2) + [self.audio_end_id]
            clip, i = clip + 1, end + 1
        if clip != len(spans):
            raise ValueError(f"{len(spans)} audio clips given but the prompt has {clip} <audio> tags.")
        return out

    def __call__(self, text: str, add_special_tokens: bool = False, **_: object) -> dict[str, list[int]]:
        """Plain text to ids (special-token text is encoded as special tokens, as the release's default)."""
        return {"input_ids": self.encode(text)}

    # ---- decoding and lookups ---------------------------------------------------------------------------
    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False, errors: str | None = None) -> str:
        """``_decode``: with ``skip_special_tokens`` only BPE ranks (ids below ``<|endoftext|>``) are kept."""
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < self.eod_id]
        # The LM's rows past the vocabulary (its embedding is padded to a multiple of 64) have no text; a logit lens
        # can still rank them first, so they read as ``<|unused_i|>`` instead of failing.
        text, run = "", []
        for i in ids + [None]:
            if i is not None and i in self.decoder:
                run.append(i)
                continue
            text += self.encoding.decode(run, errors=errors or self.errors) if run else ""
            text += f"<|unused_{i}|>" if i is not None else ""
            run = []
        return text

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Readable token strings (byte tokens decoded with replacement, as a printout wants them)."""
        def one(i: int) -> str:
            tok = self.decoder.get(int(i), f"<|unused_{int(i)}|>")  # the LM's rows past the vocabulary
            return tok if isinstance(tok, str) else tok.decode("utf-8", errors="replace")
        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | bytes | Collection[str | bytes]) -> int | list[int] | None:
        def one(tok: str | bytes) -> int | None:
            if tok in self.special_tokens:
                return self.special_tokens[tok]  # type: ignore[index]
            return self.mergeable_ranks.get(tok.encode("utf-8") if isinstance(tok, str) else tok)
        return one(tokens) if isinstance(tokens, (str, bytes)) else [one(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    @property
    def pad_token_id(self) -> int:
        return self.eod_id

    @property
    def eos_token_id(self) -> int:
        return self.eod_id
