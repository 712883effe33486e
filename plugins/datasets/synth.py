"""Controlled speech stimuli from espeak-ng: one sentence, many languages, voices and channels.

Real corpora confound what is said with who says it and how it was recorded. Synthetic speech lets an
experiment vary one factor at a time (language with meaning fixed, voice with words fixed, channel with
everything else fixed), which is what the paraphrase, language and device analyses need. espeak-ng is
robotic but fast, offline and deterministic, so a dataset is a pure function of its arguments and can be
cached by content.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import shutil
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf
import soxr
from lalm_probe.core.commands import DataCommand
from lalm_probe.core.data import Dataset, Stimulus, write_manifest
from lalm_probe.core.errors import UserError, unknown_name
from lalm_probe.core.files import cache_dir
from lalm_probe.core.languages import espeak_voice, espeak_voices
from lalm_probe.core.progress import progress_bar
from lalm_probe.plugins.datasets.conditions import apply_condition, check_condition
from lalm_probe.plugins.datasets.corpora import split_spec
from lalm_probe.plugins.datasets.sentences import Sentence, load_sentences, select_sentences, table_digest
from rich.console import Console

SAMPLE_RATE = 16000
# espeak-ng peaks at full scale for some voices (zh, vi); 6 dB of headroom lets noise and resampling overshoot
# stay below clipping, so no file needs rescaling and the clean and degraded versions keep one level.
HEADROOM = 0.5
PIPELINE_VERSION = "2"  # bump when rendering changes, so cached files are not reused by mistake

# Language (ISO 639-1) -> espeak-ng voice, from the core language table.
ESPEAK_VOICES: dict[str, str] = espeak_voices()
VOICE_GENDER: dict[str, str] = {**{f"m{i}": "male" for i in range(1, 9)}, **{f"f{i}": "female" for i in range(1, 6)}}


def _require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError("espeak-ng is not installed; it is needed to synthesise speech. Install it with: "
                        "apt-get install espeak-ng (Debian/Ubuntu) or brew install espeak-ng (macOS).")
    return exe


@lru_cache(maxsize=None)
def espeak_version(exe: str) -> str:
    """The version string, part of every cache key: a new espeak-ng may pronounce differently."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split("Data at")[0].strip() or "unknown"


@dataclass(frozen=True)
class _Job:
    """Everything rendered from one espeak-ng call: a base utterance and its conditions."""

    exe: str
    spoken: str
    voice: str
    rate: int
    pitch: int
    seed: int
    outputs: tuple[tuple[str, Path], ...]  # (condition, wav path)


def _espeak(job: _Job) -> np.ndarray:
    cmd = [job.exe, "-b", "1", "-v", job.voice, "-s", str(job.rate), "-p", str(job.pitch), "--stdout"]
    proc = subprocess.run(cmd, input=job.spoken.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise UserError(f"espeak-ng failed for voice {job.voice} on {job.spoken!r}: "
                        f"{proc.stderr.decode(errors='replace').strip() or 'no audio produced'}")
    with wave.open(io.BytesIO(proc.stdout)) as w:  # header sizes are bogus on a pipe; wave reads to EOF
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    x = pcm.astype(np.float32) * (HEADROOM / 32768.0)
    return soxr.resample(x, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)  # deterministic, GIL-free


def _render(job: _Job) -> int:
    """Render the missing outputs of one job; returns how many files it wrote."""
    todo = [(c, p) for c, p in job.outputs if not p.exists()]
    if not todo:
        return 0
    base = _espeak(job)
    for condition, path in todo:
        y = apply_condition(base, SAMPLE_RATE, condition, seed=job.seed).astype(np.float64)
        peak = float(np.max(np.abs(y))) if y.size else 0.0
        if peak > 0.999:  # only very low SNRs get here; scaling keeps the SNR
            y *= 0.999 / peak
        pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        sf.write(tmp, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    return len(todo)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def _speech_id(sent: Sentence, voice: str, rate: int, pitch: int, condition: str) -> str:
    return f"{sent.semantic_id}-{sent.language}-{voice}-r{rate}-p{pitch}-{condition}"


def _plan(exe: str, version: str, sent: Sentence, voice: str, rate: int, pitch: int, conditions: Sequence[str],
          wav_dir: Path) -> _Job:
    """One espeak-ng call and its output files, each named by a hash of all that shapes its audio."""
    voice_name = f"{espeak_voice(sent.language)}+{voice}"
    base = _key(sent.spoken, voice_name, rate, pitch, version, SAMPLE_RATE, PIPELINE_VERSION)
    outputs = tuple((c, wav_dir / f"{_speech_id(sent, voice, rate, pitch, c)}.{_key(base, c)[:12]}.wav")
                    for c in conditions)
    return _Job(exe, sent.spoken, voice_name, rate, pitch, int(base[:8], 16), outputs)


def synthesize(out_dir: str | Path, languages: Sequence[str], voices: Sequence[str], conditions: Sequence[str],
               rates: Sequence[int] = (175,), pitches: Sequence[int] = (50,), sentence_ids: Iterable[str] | None = None,
               include_text: bool = True, workers: int | None = None, progress: bool = True) -> Dataset:
    """Render every (sentence, language, voice, rate, pitch, condition) to 16 kHz wav and write a manifest.

    The full grid is rendered so any factor can be contrasted with all others held fixed. Files are named by
    a hash of everything that shapes their audio, so an unchanged item is never rendered twice. Text items
    (one per sentence and language) let an analysis pair speech with its transcript and translations.
    ``sentence_ids`` takes ids (s01, p02a) or the set names parallel (default), paraphrase and all.
    """
    languages, voices, conditions = list(languages), list(voices), list(conditions)
    rates, pitches = [int(r) for r in rates], [int(p) for p in pitches]
    for lang in languages:
        if lang not in ESPEAK_VOICES:
            raise unknown_name("language", lang, ESPEAK_VOICES)
    for v in voices:
        if v not in VOICE_GENDER:
            raise unknown_name("voice", v, VOICE_GENDER)
    for c in conditions:
        check_condition(c)
    for r in rates:
        if not 80 <= r <= 450:
            raise UserError(f"Speaking rate {r} is outside espeak-ng's range 80-450 words per minute.")
    for p in pitches:
        if not 0 <= p <= 99:
            raise UserError(f"Pitch {p} is outside espeak-ng's range 0-99.")
    if not (languages and voices and conditions and rates and pitches):
        raise UserError("synthesize needs at least one language, voice, condition, rate and pitch.")
    by_key = {(s.semantic_id, s.language): s for s in load_sentences()}
    ids = select_sentences(sentence_ids)
    for sid in ids:
        missing = [lang for lang in languages if (sid, lang) not in by_key]
        if missing:
            have = sorted(lang for (s, lang) in by_key if s == sid)
            raise UserError(f"Sentence '{sid}' has no text in {', '.join(missing)}; it exists in: {', '.join(have)}.")

    exe = _require_espeak()
    version = espeak_version(exe)
    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    items: list[Stimulus] = []
    jobs: list[_Job] = []
    for sid, lang in itertools.product(ids, languages):
        sent = by_key[(sid, lang)]
        extra = {"paraphrase_of": sent.paraphrase_of, "structure": sid[-1]} if sent.paraphrase_of else {}
        for voice, rate, pitch in itertools.product(voices, rates, pitches):
            job = _plan(exe, version, sent, voice, rate, pitch, conditions, out_dir / "wav")
            jobs.append(job)
            for cond, path in job.outputs:
                labels = {"semantic_id": sid, "language": lang, "modality": "speech", "voice": voice,
                          "gender": VOICE_GENDER[voice], "rate": rate, "pitch": pitch, "condition": cond,
                          "transcript": sent.text, **extra}
                items.append(Stimulus(id=_speech_id(sent, voice, rate, pitch, cond), audio=path, labels=labels))
        if include_text:
            labels = {"semantic_id": sid, "language": lang, "modality": "text", **extra}
            items.append(Stimulus(id=f"{sid}-{lang}-text", text=sent.text, labels=labels))

    _run_jobs([j for j in jobs if not all(p.exists() for _, p in j.outputs)], workers, progress)
    dataset = Dataset(items, name=out_dir.name)
    write_manifest(dataset, out_dir / "manifest.jsonl")
    return dataset


def _run_jobs(jobs: list[_Job], workers: int | None, progress: bool) -> None:
    """Render in parallel threads: the work is espeak-ng subprocesses and NumPy/SciPy calls that release the GIL."""
    if not jobs:
        return
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if not progress:
            list(pool.map(_render, jobs))
            return
        with progress_bar("synthesising speech", len(jobs)) as advance:
            for _ in pool.map(_render, jobs):
                advance(1)


# --- named datasets for --data synth:<name> --------------------------------------------------------------

PRESETS: dict[str, dict[str, list[str]]] = {
    "parallel": {"sentences": ["parallel"], "languages": ["en", "fr", "de", "es", "zh", "ja", "id"],
                 "voices": ["m1", "f2"], "conditions": ["clean"]},
    # the default of `probe run`: small enough for a first run on a laptop CPU with a real model
    "demo": {"sentences": ["s01", "s02", "s03", "s04"], "languages": ["en", "fr", "de", "es", "zh", "ja", "id"],
             "voices": ["m1"], "conditions": ["clean"]},
    "paraphrase": {"sentences": ["paraphrase"], "languages": ["en"], "voices": ["m1", "f2"], "conditions": ["clean"]},
    "devices": {"sentences": ["parallel"], "languages": ["en"], "voices": ["m1", "f2"],
                "conditions": ["clean", "telephone", "codec", "noise10db", "reverb"]},
    "voices": {"sentences": ["parallel"], "languages": ["en"], "voices": list(VOICE_GENDER), "conditions": ["clean"]},
}
_LIST_OPTIONS = ("languages", "voices", "conditions", "rates", "pitches", "sentences")


def synth_source(name: str) -> Dataset:
    """Build a named synthetic dataset, e.g. ``parallel`` or ``parallel?languages=en,fr&voices=m1``.

    Presets: parallel (built-in sentences in 7 languages, voices m1/f2, with text items), paraphrase (English
    paraphrase pairs), devices (English under 5 recording conditions), voices (English in all 13 voices).
    Options: languages, voices, conditions, rates, pitches, sentences (comma lists), text (yes/no), workers.
    """
    preset, opts = split_spec(name)
    if preset not in PRESETS:
        raise unknown_name("synthetic dataset", preset, PRESETS)
    allowed = {*_LIST_OPTIONS, "text", "workers"}
    for key in opts:
        if key not in allowed:
            raise UserError(f"Unknown option '{key}' for synth:{preset}. Allowed: {', '.join(sorted(allowed))}.")
    params: dict[str, list[str]] = {**PRESETS[preset], "rates": ["175"], "pitches": ["50"]}
    for key in _LIST_OPTIONS:
        if key in opts:
            params[key] = [v.strip() for v in opts[key].split(",") if v.strip()]
    text = opts.get("text", "yes").lower() not in ("0", "no", "false", "off")
    out = default_out_dir(params, text)
    ds = synthesize(out, params["languages"], params["voices"], params["conditions"],
                    rates=_ints(params["rates"], "rates"), pitches=_ints(params["pitches"], "pitches"),
                    sentence_ids=params["sentences"], include_text=text,
                    workers=int(opts["workers"]) if opts.get("workers", "").isdigit() else None)
    ds.name = f"synth-{preset}"
    return ds


def default_out_dir(params: dict[str, list[str]], include_text: bool) -> Path:
    """A cache folder named by a hash of the request, the sentence table and the espeak-ng version."""
    version = espeak_version(_require_espeak())
    digest = _key({k: params[k] for k in sorted(params)}, include_text, version, table_digest(), PIPELINE_VERSION)
    return cache_dir() / "synth" / digest[:16]


def _ints(values: Sequence[str], what: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{what} takes whole numbers separated by commas; got {','.join(values)}.") from None


# --- CLI: probe data synth ------------------------------------------------------------------------------

def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``probe data synth``; lists are comma-separated."""
    parser.add_argument("--languages", default="en,fr,de,es,zh,ja,id",
                        help=f"ISO codes; available: {','.join(ESPEAK_VOICES)}")
    parser.add_argument("--voices", default="m1,f2", help="espeak-ng variants m1..m8 (male), f1..f5 (female)")
    parser.add_argument("--conditions", default="clean",
                        help="clean, telephone, codec, mulaw, noise<N>db, reverb, reverb<N>ms")
    parser.add_argument("--rates", default="175", help="speaking rates in words per minute (80-450)")
    parser.add_argument("--pitches", default="50", help="pitches 0-99")
    parser.add_argument("--sentences", default="parallel",
                        help="sentence ids (s01,s02,p01a) or a set: parallel, paraphrase, all")
    parser.add_argument("--out", default=None, help="output folder (default: a cache folder named by the request)")
    parser.add_argument("--no-text", action="store_true", help="leave out the text items")
    parser.add_argument("--workers", type=int, default=None, help="parallel renders (default: all cores)")


def run_synth(args: argparse.Namespace) -> int:
    """Render the requested grid and say where the manifest is."""
    params = {k: [v.strip() for v in str(getattr(args, k)).split(",") if v.strip()] for k in _LIST_OPTIONS}
    out = Path(args.out) if args.out else default_out_dir(params, not args.no_text)
    start = time.perf_counter()
    ds = synthesize(out, params["languages"], params["voices"], params["conditions"],
                    rates=_ints(params["rates"], "rates"), pitches=_ints(params["pitches"], "pitches"),
                    sentence_ids=params["sentences"], include_text=not args.no_text, workers=args.workers)
    n_speech = sum(it.has_audio for it in ds)
    Console().print(f"[bold green]{len(ds)} items[/] ({n_speech} speech, {len(ds) - n_speech} text) in "
                    f"{time.perf_counter() - start:.1f} s\nmanifest: [bold]{out / 'manifest.jsonl'}[/]\n"
                    f"use it with: --data {out / 'manifest.jsonl'}", soft_wrap=True)  # paths stay copyable
    return 0


class SynthCommand(DataCommand):
    """``probe data synth``: render a grid of espeak-ng speech to wav files and a manifest."""

    name = "synth"
    description = "synthesise parallel multilingual speech with espeak-ng"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_synth_arguments(parser)

    def run(self, args: argparse.Namespace) -> int:
        return run_synth(args)
