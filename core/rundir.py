"""The run folder: one lock, one ``run.json``, and the rule that a finished run is never damaged by a later one.

``run.json`` says ``running`` until every file is written and ``complete`` after, so a crashed run is never
mistaken for a finished one. Rerunning with the same settings resumes (collection continues where it stopped);
rerunning with other settings is refused before anything is written, naming the setting that differs; a second
process on the same folder is refused by a lock (shards of one run lock their own part).
"""

from __future__ import annotations

import errno
import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError
from .files import write_json

RECORD = "run.json"
# Settings that make two runs the same run (others, such as the device or batch size, may change on resume).
IDENTITY = ("model", "checkpoint", "analysis", "data", "interventions", "dtype", "seed", "baseline", "force_target",
            "store_dtype")


def make_folder(path: Path) -> Path:
    """Create the run folder, turning file-system failures into one clear sentence."""
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file, not a folder; choose a folder.")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".probe-write-test"
        probe.write_text("")
        probe.unlink()
    except PermissionError:
        raise UserError(f"Cannot write to {path} (permission denied); choose another --out folder.") from None
    except OSError as exc:
        raise UserError(f"Cannot use {path} as a run folder: {exc.strerror or exc}.") from None
    return path


@contextmanager
def locked(path: Path, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on the run folder for the duration; a second holder is refused at once."""
    handle = open(path / name, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise UserError(f"Another probe process is using {path}; wait for it to finish or choose another "
                            "--out folder.") from None
        raise
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def read_record(path: Path) -> dict[str, Any] | None:
    """The run's record, or None for a new folder."""
    record = path / RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{record} is corrupt; move the folder away to start over.") from None


def differing_setting(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first identity setting that differs between two run configs, as a sentence fragment."""
    for key in IDENTITY:
        if old.get(key) != new.get(key):
            return f"{key} was {old.get(key)!r}, now {new.get(key)!r}"
    return None


def write_record(path: Path, record: dict[str, Any]) -> None:
    write_json(path / RECORD, record)

