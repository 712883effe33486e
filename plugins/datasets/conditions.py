"""Recording-condition transforms: the same utterance as if heard through another channel.

The device experiments (a sentence recorded through two microphones, a phone line, a noisy room) need
controlled channel changes that leave the words alone. Every transform here is deterministic, keeps the
input's length and rate (so frame positions still line up with the clean version), and takes float32 mono
audio. Names are strings so they can travel in labels, ids and CLI flags:

    clean           unchanged
    telephone       300-3400 Hz band-pass plus an 8 kHz round trip (a narrow-band phone line)
    codec           GSM 06.10 at 8 kHz round trip through sox (a lossy mobile-phone codec)
    mulaw           G.711 mu-law at 8 kHz round trip through sox (a landline codec)
    noise<N>db      white Gaussian noise at exactly N dB SNR (noise10db, noise0db, noise-5db)
    reverb          convolution with a synthetic room impulse response (RT60 500 ms)
    reverb<N>ms     the same with RT60 = N ms (reverb300ms)
"""

from __future__ import annotations

import re
import shutil
import subprocess
from math import gcd
from typing import Callable

import numpy as np
import scipy.signal as ss
from lalm_probe.core.errors import UserError

CONDITIONS: tuple[str, ...] = ("clean", "telephone", "codec", "mulaw", "noise<N>db", "reverb", "reverb<N>ms")

_NOISE = re.compile(r"^noise(-?\d+(?:\.\d+)?)db$")
_REVERB = re.compile(r"^reverb(?:(\d+)ms)?$")
_ROOM_SEED = 20240601  # one fixed synthetic room, so every item is "recorded" in the same place


def apply_condition(wav: np.ndarray, rate: int, name: str, seed: int = 0) -> np.ndarray:
    """Return ``wav`` as heard through condition ``name``; same input, name and seed give the same bytes.

    ``seed`` only matters for noise: pass a per-item seed so items do not all share one noise sample.
    """
    transform = _parse(name)
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim != 1:
        raise UserError(f"Condition '{name}' needs mono audio (a 1-D array); got shape {x.shape}.")
    if rate <= 0:
        raise UserError(f"Condition '{name}': the sample rate must be positive, got {rate}.")
    if x.size == 0:
        return x.copy()
    y = transform(x, int(rate), int(seed))
    return np.asarray(y, dtype=np.float32)


def check_condition(name: str) -> str:
    """Validate a condition name before any work starts (so a typo fails fast, not after rendering)."""
    _parse(name)
    return name


def _parse(name: str) -> Callable[[np.ndarray, int, int], np.ndarray]:
    fixed = {"clean": lambda x, r, s: x.copy(), "telephone": _telephone, "codec": _gsm, "mulaw": _mulaw}
    if name in fixed:
        return fixed[name]
    m = _NOISE.match(name)
    if m:
        snr = float(m.group(1))
        return lambda x, r, s: add_noise(x, snr, seed=s)
    m = _REVERB.match(name)
    if m:
        rt60 = int(m.group(1)) / 1000 if m.group(1) else 0.5
        if not 0.05 <= rt60 <= 5:
            raise UserError(f"Condition '{name}': RT60 must be between 50 and 5000 ms.")
        return lambda x, r, s: reverb(x, r, rt60)
    raise UserError(f"Unknown recording condition '{name}'. Available: {', '.join(CONDITIONS)} "
                    "(e.g. noise10db, noise-5db, reverb300ms).")


def add_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """Add white Gaussian noise scaled so that 10*log10(P_signal / P_noise) equals ``snr_db`` exactly."""
    x64 = x.astype(np.float64)
    p_x = float(np.mean(x64 ** 2))
    if p_x == 0.0:
        raise UserError("Cannot add noise at a set SNR to silent audio (its power is zero).")
    n = np.random.default_rng(seed).standard_normal(x.size)
    n *= np.sqrt(p_x / (float(np.mean(n ** 2)) * 10 ** (snr_db / 10)))
    return (x64 + n).astype(np.float32)


def _telephone(x: np.ndarray, rate: int, seed: int) -> np.ndarray:
    """Pass through an 8 kHz line band-limited to the 300-3400 Hz telephone band."""
    if rate < 8000:
        raise UserError(f"Condition 'telephone' needs audio at 8 kHz or more; got {rate} Hz.")
    g = gcd(rate, 8000)
    line = ss.resample_poly(x.astype(np.float64), 8000 // g, rate // g) if rate != 8000 else x.astype(np.float64)
    # 64 ms linear-phase FIR at 8 kHz: steep band edges without phase distortion
    h = ss.firwin(513, [300, 3400], pass_zero=False, fs=8000, window=("kaiser", 8.0))
    line = ss.oaconvolve(line, h, mode="same")
    if rate == 8000:
        return line
    return _fit_length(ss.resample_poly(line, rate // g, 8000 // g), x.size)


def reverb(x: np.ndarray, rate: int, rt60: float = 0.5) -> np.ndarray:
    """Convolve with a seeded exponential-decay room response; loudness is kept equal to the input's.

    The response is a direct path plus a decaying Gaussian tail whose energy equals the direct path's
    (0 dB direct-to-reverberant ratio, a talker a metre or two away in a furnished room).
    """
    n = max(1, int(rt60 * rate))
    t = np.arange(n) / rate
    tail = np.random.default_rng(_ROOM_SEED).standard_normal(n) * np.exp(-6.908 * t / rt60)  # -60 dB at rt60
    tail[0] = 0.0
    ir = tail / np.sqrt(np.sum(tail ** 2))
    ir[0] = 1.0
    x64 = x.astype(np.float64)
    y = ss.fftconvolve(x64, ir)[: x.size]
    p_y = float(np.mean(y ** 2))
    if p_y > 0:
        y *= np.sqrt(float(np.mean(x64 ** 2)) / p_y)
    return y


def _gsm(x: np.ndarray, rate: int, seed: int) -> np.ndarray:
    return _sox_codec(x, rate, ["-t", "gsm", "-r", "8000", "-c", "1"])


def _mulaw(x: np.ndarray, rate: int, seed: int) -> np.ndarray:
    return _sox_codec(x, rate, ["-t", "ul", "-r", "8000", "-c", "1"])


def _sox_codec(x: np.ndarray, rate: int, codec: list[str]) -> np.ndarray:
    """Encode to ``codec`` and decode back with sox. -D (no dither) and -R keep it byte-for-byte repeatable."""
    sox = shutil.which("sox")
    if sox is None:
        raise UserError("The codec conditions need SoX, which is not installed. "
                        "Install it with: apt-get install sox libsox-fmt-all")
    raw = ["-t", "f32", "-r", str(rate), "-c", "1"]
    clipped = np.clip(x, -1.0, 1.0).astype("<f4")
    encoded = _run([sox, "-D", "-R", *raw, "-", *codec, "-"], clipped.tobytes())
    decoded = _run([sox, "-D", "-R", *codec, "-", *raw, "-"], encoded)
    return _fit_length(np.frombuffer(decoded, dtype="<f4").astype(np.float64), x.size)


def _run(cmd: list[str], data: bytes) -> bytes:
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"sox failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _fit_length(y: np.ndarray, n: int) -> np.ndarray:
    """Codecs pad to whole frames; trim or zero-pad so the output lines up with the input."""
    if y.size >= n:
        return y[:n]
    return np.concatenate([y, np.zeros(n - y.size, dtype=y.dtype)])
