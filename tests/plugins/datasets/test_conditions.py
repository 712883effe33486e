"""Recording conditions: exact SNR, a real telephone band, determinism, and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.datasets import conditions
from lalm_probe.plugins.datasets.conditions import CONDITIONS, add_noise, apply_condition, check_condition

RATE = 16000
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed")


def speech_like(seconds: float = 1.5, rate: int = RATE) -> np.ndarray:
    """A voiced, syllable-modulated harmonic complex reaching 8 kHz, with pauses: broadband like speech."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 60))
    envelope = np.clip(np.sin(2 * np.pi * 3 * t), 0, None)  # syllables with silent gaps
    return (0.3 * x / np.max(np.abs(x)) * envelope).astype(np.float32)


def energy_above(y: np.ndarray, hz: float, rate: int = RATE) -> float:
    spec = np.abs(np.fft.rfft(y.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(y.size, 1 / rate)
    return float(spec[freqs > hz].sum() / spec.sum())


def snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    x = clean.astype(np.float64)
    n = noisy.astype(np.float64) - x
    return float(10 * np.log10(np.mean(x ** 2) / np.mean(n ** 2)))


@pytest.mark.parametrize("snr", [20.0, 10.0, 0.0, -5.0, 7.5])
def test_noise_hits_the_requested_snr(snr: float) -> None:
    x = speech_like()
    y = apply_condition(x, RATE, f"noise{snr:g}db", seed=3)
    assert abs(snr_db(x, y) - snr) < 0.1
    assert abs(snr_db(x, y) - snr) < 1e-4  # exact up to float32 rounding


def test_noise_is_seeded() -> None:
    x = speech_like()
    a, b = apply_condition(x, RATE, "noise10db", seed=1), apply_condition(x, RATE, "noise10db", seed=1)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != apply_condition(x, RATE, "noise10db", seed=2).tobytes()


def test_noise_on_silence_is_refused() -> None:
    with pytest.raises(UserError, match="silent"):
        add_noise(np.zeros(100, np.float32), 10)


def test_telephone_removes_energy_above_3400_hz() -> None:
    x = speech_like()
    clean, phone = energy_above(x, 3400), energy_above(apply_condition(x, RATE, "telephone"), 3400)
    assert clean > 0.01
    assert phone < 1e-3
    assert energy_above(apply_condition(x, RATE, "telephone"), 4000) < 1e-5


def test_reverb_smears_energy_into_pauses_and_keeps_loudness() -> None:
    x = speech_like()
    y = apply_condition(x, RATE, "reverb")
    gaps = np.sin(2 * np.pi * 3 * np.arange(x.size) / RATE) < -0.5  # inside the silent half-periods
    assert np.mean(y[gaps] ** 2) > 100 * np.mean(x[gaps] ** 2) + 1e-8
    assert np.sqrt(np.mean(y ** 2)) == pytest.approx(np.sqrt(np.mean(x ** 2)), rel=1e-3)
    short = apply_condition(x, RATE, "reverb200ms")
    assert np.mean(short[gaps] ** 2) < np.mean(y[gaps] ** 2)  # a shorter RT60 leaves less tail


@pytest.mark.parametrize("name", ["clean", "telephone", "noise10db", "noise-5db", "reverb", "reverb300ms",
                                  pytest.param("codec", marks=needs_sox), pytest.param("mulaw", marks=needs_sox)])
def test_every_condition_is_deterministic_and_keeps_length(name: str) -> None:
    x = speech_like()
    a, b = apply_condition(x, RATE, name, seed=5), apply_condition(x, RATE, name, seed=5)
    assert a.dtype == np.float32 and a.shape == x.shape
    assert a.tobytes() == b.tobytes()
    assert np.all(np.isfinite(a))


@needs_sox
def test_codecs_are_narrow_band_and_lossy() -> None:
    x = speech_like()
    for name in ("codec", "mulaw"):
        y = apply_condition(x, RATE, name)
        assert energy_above(y, 4000) < 1e-3  # 8 kHz codecs cannot carry anything above 4 kHz
        assert 0.5 < np.corrcoef(x, y)[0, 1] < 0.9999  # same signal, audibly changed


def test_unknown_condition_lists_what_exists() -> None:
    with pytest.raises(UserError) as err:
        apply_condition(speech_like(), RATE, "noisy")
    for name in CONDITIONS:
        assert name in str(err.value)
    with pytest.raises(UserError):
        check_condition("noise10")
    assert check_condition("noise-5db") == "noise-5db"


def test_codec_without_sox_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conditions.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install sox"):
        apply_condition(speech_like(), RATE, "codec")


def test_bad_audio_shapes_are_user_errors() -> None:
    with pytest.raises(UserError, match="mono"):
        apply_condition(np.zeros((2, 100), np.float32), RATE, "clean")
    with pytest.raises(UserError, match="8 kHz"):
        apply_condition(np.ones(100, np.float32), 4000, "telephone")
