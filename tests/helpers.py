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


def stub_view(stacks: dict, lens_stack: str | None = None, modalities: tuple[str, ...] = ("speech", "text"),
              name: str = "fake", tokenizer=None, lens=None):
    """A real ModelView over a stub plugin with declared stacks and no weights: analyses run on planted stores.

    ``stacks``: name -> number of layers, or a dict with ``layers``, ``runs``, ``unembed``, ``components`` and
    ``extras``. ``lens``: a function ``(hidden, stack, norm, layer) -> logits`` standing in for the unembedding.
    """
    from types import SimpleNamespace

    from lalm_probe.core.stacks import ResolvedStack, Stack
    from lalm_probe.core.view import ModelView

    resolved = {}
    for stack, spec in stacks.items():
        spec = {"layers": spec} if isinstance(spec, int) else spec
        comps = spec.get("components", ("out",))
        extras = spec.get("extras", ())
        st = Stack(stack, layers=(stack,), runs=spec.get("runs", "once"), components={c: c for c in comps},
                   extras={e: e for e in extras})
        resolved[stack] = ResolvedStack(st, stack, spec["layers"], None, spec.get("unembed"), {e: e for e in extras},
                                        {c: c for c in comps}, {})
    plugin = SimpleNamespace(name=name, resolved=resolved, lens_stack=lens_stack, modalities=modalities,
                             tokenizer=tokenizer)
    view = ModelView(plugin)
    if lens is not None:
        view.lens = lens
    return view
