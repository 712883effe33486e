"""Small helpers shared by tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import numpy as np

SR = 16000


def tone(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    """A sine tone: audio with known content that needs no synthesiser."""
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)
