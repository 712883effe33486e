"""The built-in datasets plugin: ``--data synth:parallel``, ``--data fleurs:/path``, ... and ``probe data synth``.

Registered through the ``lalm_probe`` entry-point group like any third-party dataset plugin.
"""

from __future__ import annotations

from typing import Callable

from lalm_probe.core.registry import hookimpl
from lalm_probe.plugins.datasets.corpora import SOURCES
from lalm_probe.plugins.datasets.synth import SynthCommand, synth_source


@hookimpl
def lalm_probe_datasets() -> dict[str, Callable]:
    return {"synth": synth_source, **SOURCES}


@hookimpl
def lalm_probe_data_commands() -> list[type]:
    return [SynthCommand]
