"""Small helpers shared by tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import importlib.metadata as md

import numpy as np
import pytest

SR = 16000


def tone(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    """A sine tone: audio with known content that needs no synthesiser."""
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def add_entry_point(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """Make discovery see one more ``lalm_probe`` entry point, as if a package declaring it were installed."""
    from lalm_probe.core import registry

    real = registry._entry_points
    extra = md.EntryPoint(name=name, value=value, group=registry.GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: [*real(), extra])
