"""espeak-ng stimuli: the sentence table, a complete label grid, byte-identical renders, caching, errors."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lalm_probe.core.data import load_manifest
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.datasets import synth
from lalm_probe.plugins.datasets.sentences import load_sentences
from lalm_probe.plugins.datasets.synth import (
    ESPEAK_VOICES,
    VOICE_GENDER,
    add_synth_arguments,
    run_synth,
    synth_source,
    synthesize,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LALM_PROBE_CACHE", str(cache))
    return cache


def wav_hashes(dataset) -> dict[str, str]:
    return {it.id: hashlib.sha256(Path(it.audio).read_bytes()).hexdigest() for it in dataset if it.has_audio}


def by_id(dataset) -> dict:
    return {it.id: it for it in dataset}


def energy_above(y: np.ndarray, hz: float, rate: int) -> float:
    spec = np.abs(np.fft.rfft(y.astype(np.float64))) ** 2
    return float(spec[np.fft.rfftfreq(y.size, 1 / rate) > hz].sum() / spec.sum())


# --- the built-in sentences ------------------------------------------------------------------------------

def test_sentence_table_is_parallel_and_readable_by_espeak() -> None:
    table = load_sentences()
    parallel = [s for s in table if not s.paraphrase_of]
    ids = sorted({s.semantic_id for s in parallel})
    langs = {s.language for s in parallel}
    assert len(ids) >= 20
    assert {"en", "fr", "de", "es", "zh", "ja", "id", "vi"} <= langs <= set(ESPEAK_VOICES)
    have = {(s.semantic_id, s.language) for s in parallel}
    assert have == set(itertools.product(ids, langs))  # every sentence in every language
    cjk = re.compile(r"[\u4e00-\u9fff]")
    assert not any(cjk.search(s.text + s.spoken) for s in parallel if s.language == "ja")  # kana only
    assert all(cjk.search(s.text) for s in parallel if s.language == "zh")  # hanzi


def test_paraphrase_pairs_are_marked() -> None:
    para = [s for s in load_sentences() if s.paraphrase_of]
    groups: dict[str, set[str]] = {}
    for s in para:
        assert s.language == "en" and s.semantic_id.startswith(s.paraphrase_of)
        groups.setdefault(s.paraphrase_of, set()).add(s.semantic_id)
    assert len(groups) >= 4
    assert all(ids == {g + "a", g + "b"} for g, ids in groups.items())
    texts = {s.semantic_id: s.text for s in para}
    assert all(texts[g + "a"] != texts[g + "b"] for g in groups)


# --- rendering -------------------------------------------------------------------------------------------

@needs_espeak
def test_label_grid_is_complete_and_manifest_round_trips(tmp_path: Path) -> None:
    langs, voices, conds, rates = ["en", "zh", "ja"], ["m1", "f2"], ["clean", "noise10db"], [150, 175]
    ds = synthesize(tmp_path / "out", langs, voices, conds, rates=rates, sentence_ids=["s01", "s02"], progress=False)
    speech = [it for it in ds if it.labels["modality"] == "speech"]
    text = [it for it in ds if it.labels["modality"] == "text"]
    grid = {(it.labels["semantic_id"], it.labels["language"], it.labels["voice"], it.labels["rate"],
             it.labels["pitch"], it.labels["condition"]) for it in speech}
    assert grid == set(itertools.product(["s01", "s02"], langs, voices, rates, [50], conds))
    assert len(speech) == len(grid)
    assert {(it.labels["semantic_id"], it.labels["language"]) for it in text} == set(itertools.product(["s01", "s02"], langs))
    assert all(it.text and it.audio is None for it in text)
    assert all(it.labels["gender"] == VOICE_GENDER[it.labels["voice"]] for it in speech)
    assert "s02-ja-f2-r150-p50-noise10db" in by_id(ds) and "s02-ja-text" in by_id(ds)
    info = sf.info(str(speech[0].audio))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")

    loaded = load_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [it.id for it in loaded] == [it.id for it in ds]
    assert [it.labels for it in loaded] == [it.labels for it in ds]
    assert all(Path(it.audio).is_file() for it in loaded if it.has_audio)


@needs_espeak
def test_two_renders_are_byte_identical(tmp_path: Path) -> None:
    args = dict(languages=["en", "fr"], voices=["f2"], conditions=["clean", "telephone", "noise10db", "reverb"],
                sentence_ids=["s03"], progress=False)
    a = synthesize(tmp_path / "a", workers=2, **args)
    b = synthesize(tmp_path / "b", workers=1, **args)
    ha, hb = wav_hashes(a), wav_hashes(b)
    assert len(ha) == 8 and ha == hb
    assert len(set(ha.values())) == 8  # every condition and language really differs


@needs_espeak
def test_second_run_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = dict(languages=["de"], voices=["m1", "f2"], conditions=["clean", "noise0db"], sentence_ids=["s04"],
                progress=False)
    first = synthesize(tmp_path / "out", **args)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "wav").iterdir()}

    def no_espeak(job):
        raise AssertionError("espeak-ng ran although every file was cached")

    monkeypatch.setattr(synth, "_espeak", no_espeak)
    second = synthesize(tmp_path / "out", **args)
    assert wav_hashes(first) == wav_hashes(second)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "wav").iterdir()}


@needs_espeak
@pytest.mark.parametrize("lang", ["en", "vi"])  # vi: espeak-ng's loudest voice, peaks at full scale
def test_rendered_noise_and_telephone_are_what_they_claim(tmp_path: Path, lang: str) -> None:
    ds = synthesize(tmp_path / "out", [lang], ["m3"], ["clean", "noise10db", "noise-5db", "telephone"],
                    sentence_ids=["s05"], include_text=False, progress=False)
    audio = {it.labels["condition"]: sf.read(str(it.audio), dtype="float64")[0] for it in ds}
    x = audio["clean"]
    for cond, snr in (("noise10db", 10.0), ("noise-5db", -5.0)):
        y = audio[cond]
        gain = float(np.dot(x, y) / np.dot(x, x))  # 1.0 unless very loud noise made the writer scale it down
        if cond == "noise10db":
            assert gain == pytest.approx(1.0, abs=0.01)
        measured = 10 * np.log10(np.mean((gain * x) ** 2) / np.mean((y - gain * x) ** 2))
        assert abs(measured - snr) < 0.1, (cond, measured)
    assert energy_above(x, 3400, 16000) > 0.01
    assert energy_above(audio["telephone"], 3400, 16000) < 1e-3


@needs_espeak
def test_named_sources_render_into_the_cache(private_cache: Path) -> None:
    ds = synth_source("parallel?languages=en,ja&voices=m1&sentences=s01,s02")
    assert ds.name == "synth-parallel" and len(ds) == 2 * 2 * 2  # speech + text per sentence and language
    audio_dirs = {Path(it.audio).parent.parent for it in ds if it.has_audio}
    assert len(audio_dirs) == 1 and audio_dirs.pop().parent == private_cache / "synth"
    again = synth_source("parallel?languages=en,ja&voices=m1&sentences=s01,s02")
    assert wav_hashes(again) == wav_hashes(ds)

    para = synth_source("paraphrase?voices=f2&text=no")
    assert all(it.has_audio for it in para)
    groups = {it.labels["paraphrase_of"] for it in para}
    assert len(groups) >= 4 and {it.labels["structure"] for it in para} == {"a", "b"}


@needs_espeak
def test_cli_renders_and_reports_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    args = parser.parse_args(["--languages", "es,vi", "--voices", "f1", "--conditions", "clean,telephone",
                              "--sentences", "s07", "--out", str(tmp_path / "cli")])
    assert run_synth(args) == 0
    out = capsys.readouterr().out
    assert "6 items" in out and "manifest.jsonl" in out
    assert len(load_manifest(tmp_path / "cli" / "manifest.jsonl")) == 6


# --- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(languages=["xx"]), "Unknown language 'xx'.*en"),
    (dict(voices=["m9"]), "Unknown voice 'm9'.*f5.*m1"),
    (dict(conditions=["noisy"]), "Unknown recording condition 'noisy'"),
    (dict(sentence_ids=["s99"]), "Unknown sentence id 's99'.*paraphrase"),
    (dict(sentence_ids=["p01a"], languages=["fr"]), "no text in fr"),
    (dict(rates=[20]), "80-450"),
    (dict(pitches=[120]), "0-99"),
])
def test_bad_arguments_name_what_exists(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = dict(languages=["en"], voices=["m1"], conditions=["clean"], sentence_ids=["s01"], progress=False)
    with pytest.raises(UserError, match=message):
        synthesize(tmp_path / "out", **{**args, **kwargs})


def test_missing_espeak_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no espeak-ng anywhere
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        synthesize(tmp_path / "out", ["en"], ["m1"], ["clean"], sentence_ids=["s01"], progress=False)
    with pytest.raises(UserError, match="apt-get install espeak-ng"):
        synth_source("parallel")


def test_bad_source_names_and_options() -> None:
    with pytest.raises(UserError, match="Unknown synthetic dataset 'paralel'.*Did you mean 'parallel'"):
        synth_source("paralel")
    with pytest.raises(UserError, match="Unknown option 'langs'"):
        synth_source("parallel?langs=en")
