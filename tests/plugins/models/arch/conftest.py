"""Tiny twins of the three releases, each built once per session in the release layout and loaded back through the
family's own loader; plus the helpers the key-list tests share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch


@dataclass
class Tiny:
    paths: dict
    built: torch.nn.Module  # the in-memory model the saved files describe
    model: torch.nn.Module  # what the loader assembled from them
    processor: Any


@pytest.fixture(scope="session")
def ultravox(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from lalm_probe.plugins.models.arch.ultravox_io import build_tiny_ultravox, load_ultravox

    paths, built = build_tiny_ultravox(tmp_path_factory.mktemp("ultravox"))
    model, proc = load_ultravox(paths["ultravox"], audio_model=str(paths["whisper"]), text_model=str(paths["llama"]))
    return Tiny(paths, built, model, proc)


@pytest.fixture(scope="session")
def desta2(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from lalm_probe.plugins.models.arch.desta2_io import build_tiny_desta2, load_desta2

    paths, built = build_tiny_desta2(tmp_path_factory.mktemp("desta2"))
    model, proc = load_desta2(paths["desta2"], whisper_model=str(paths["whisper"]), llama_model=str(paths["llama"]))
    return Tiny(paths, built, model, proc)


@pytest.fixture(scope="session")
def salmonn(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from lalm_probe.plugins.models.arch.salmonn_io import build_tiny_salmonn, load_salmonn

    paths, built = build_tiny_salmonn(tmp_path_factory.mktemp("salmonn"))
    model, proc = load_salmonn(str(paths["salmonn"]), whisper=str(paths["whisper"]), beats=str(paths["beats"]),
                               llama=str(paths["vicuna"]))
    return Tiny(paths, built, model, proc)
