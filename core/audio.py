"""Decoding stimuli's audio, and checking all of it before any model time is spent.

Audio is decoded lazily when a batch is prepared; :func:`check_audio` runs the same decoder over every item first
(a fast pass: no resampling, no model), so a missing, corrupt, empty or non-finite file is reported in one line
naming the file and the reason before a model is loaded, instead of failing half-way through a collection.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .data import Stimulus
from .errors import UserError


def _reason(exc: BaseException) -> str:
    """A readable reason from the many exception types audio decoders raise."""
    if isinstance(exc, EOFError):
        return "the file ends early (truncated or not audio)"
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
    if name == "NoBackendError":
        return "no installed decoder reads this format"
    if "not finite" in text:
        return "it contains NaN or infinite samples"
    if name == "LibsndfileError" and ":" in text:
        text = text.rsplit(":", 1)[-1].strip()
    return text.rstrip(".") or name


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C libraries write there directly) for the duration of a decode."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _wav_shortfall(path: Path) -> tuple[int, int] | None:
    """(declared, present) bytes of a WAV's data chunk when the file ends before it (decoders read what is there
    without a word), else None."""
    with path.open("rb") as f:
        if f.read(12)[8:12] != b"WAVE":
            return None
        while len(head := f.read(8)) == 8:
            size = int.from_bytes(head[4:], "little")
            if head[:4] == b"data":
                present = path.stat().st_size - f.tell()
                return (size, present) if size > present and size != 0xFFFFFFFF else None  # 0xFFFFFFFF: streamed
            f.seek(size + (size & 1), os.SEEK_CUR)
    return None


def _decode(item: Stimulus, rate: int | None) -> tuple[np.ndarray, int]:
    """Mono float32 samples of one item at ``rate`` (None: its own rate) and that rate, or a one-line UserError."""
    import librosa  # imported late: it takes seconds, and only collection and checks need it

    if isinstance(item.audio, np.ndarray):
        if not item.sample_rate or item.sample_rate <= 0:
            raise UserError(f"Item '{item.id}': audio given as an array needs a positive sample_rate.")
        wav = np.asarray(item.audio, dtype=np.float32)
        if wav.ndim == 2:  # (channels, samples) as librosa returns it
            wav = wav.mean(axis=0) if wav.shape[0] < wav.shape[1] else wav.mean(axis=1)
        if wav.ndim != 1:
            raise UserError(f"Item '{item.id}': audio array must be 1-D or 2-D, got shape {wav.shape}.")
        if rate is not None and item.sample_rate != rate:
            wav = librosa.resample(wav, orig_sr=item.sample_rate, target_sr=rate)
        rate = rate or item.sample_rate
        where = "its audio array"
    else:
        path = Path(str(item.audio))
        where = str(path)
        if not path.is_file():
            raise UserError(f"Item '{item.id}': audio file not found: {path}")
        try:
            with warnings.catch_warnings(), _quiet_stderr():  # decoders warn (in Python and in C, e.g. mpg123)
                warnings.simplefilter("ignore")                # before failing over to another; the reason says it
                wav, rate = librosa.load(str(path), sr=rate, mono=True)
        except Exception as exc:  # soundfile, audioread and ffmpeg raise many types for bad files
            raise UserError(f"Item '{item.id}': cannot decode {path}: {_reason(exc)}.") from None
        if path.suffix.lower() == ".wav" and (short := _wav_shortfall(path)):
            raise UserError(f"Item '{item.id}': {path} is truncated: its header promises {short[0]} bytes of audio "
                            f"and the file holds {short[1]}.")
    if wav.size == 0:
        raise UserError(f"Item '{item.id}': {where} holds no samples.")
    if not np.all(np.isfinite(wav)):
        raise UserError(f"Item '{item.id}': {where} contains NaN or infinite samples.")
    if item.normalize == "peak":  # the clip as the model gets it, scaled into [-1, 1]
        peak = float(np.max(np.abs(wav)))
        wav = wav / peak if peak > 0 else wav
    return wav.astype(np.float32, copy=False), int(rate)


def load_audio(item: Stimulus, target_rate: int) -> np.ndarray:
    """Decode, mix down to mono and resample to the rate the model's feature extractor wants."""
    return _decode(item, target_rate)[0]


def check_audio(items: Iterable[Stimulus]) -> dict[str, float]:
    """Decode every item's audio once and return each clip's duration in seconds; any problem is one line: how
    many items fail and the first reason."""
    problems, seconds = [], {}
    for item in items:
        if item.has_audio:
            try:
                wav, rate = _decode(item, None)
                seconds[item.id] = len(wav) / rate
            except UserError as exc:
                problems.append(str(exc))
    if problems:
        more = f" ({len(problems) - 1} more items have unusable audio)" if len(problems) > 1 else ""
        raise UserError(problems[0].rstrip(".") + more + ".")
    return seconds
