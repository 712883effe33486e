"""Files written so that an interruption never leaves a half-written one behind, and the one cache folder.

Every result, manifest and converted checkpoint is written to a temporary name next to its target and renamed into
place (atomic on one file system), so a reader sees the old complete version or the new complete version.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

CACHE_ENV = "LALM_PROBE_CACHE"


def cache_dir() -> Path:
    """Where built and converted assets live: ``$LALM_PROBE_CACHE``, else ``~/.cache/lalm_probe``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lalm_probe")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically (NumPy scalars and paths via ``str``)."""
    return write_text(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def temp_dir_for(out: str | Path) -> Path:
    """A fresh hidden folder next to ``out`` to build into before :func:`publish_dir`; leftovers of builds that
    were killed (their process is gone) are removed first, so a killed conversion leaves nothing behind for long."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f".{out.name}.tmp-*"):
        pid = old.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    tmp = _tmp_name(out)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish_dir(tmp: Path, out: Path) -> Path:
    """Move a finished folder into place; an existing ``out`` is replaced only once ``tmp`` is complete.

    When another process published ``out`` first, its copy is kept and ``tmp`` is discarded.
    """
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not out.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return out
