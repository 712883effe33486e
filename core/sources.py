"""Built-in dataset sources (``--data synth:parallel``, ``--data fleurs:/path``), registered as a plugin."""

from __future__ import annotations

from typing import Callable

from .corpora import SOURCES
from .registry import hookimpl
from .synth import synth_source


@hookimpl
def lalm_probe_datasets() -> dict[str, Callable]:
    return {"synth": synth_source, **SOURCES}
