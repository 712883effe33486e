"""Reading CTranslate2 ``model.bin`` files: the documented binary layout, without the ``ctranslate2`` package.

A header (binary version, spec name, revision), then every variable with its shape and dtype, then aliases.
Quantised int8/int16 variables keep their ``_scale`` companions; bfloat16 is widened to float32 here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lalm_probe.core.errors import UserError

FORMAT_VERSION = 1  # of our converted output: bump when it changes, so stale caches are not reused
MAX_BINARY_VERSION = 6  # newest CTranslate2 model.bin layout this reader understands
MIN_BINARY_VERSION = 4  # first layout with explicit dtype ids; Whisper support came later anyway
SOURCE_INFO_FILE = "lalm_probe_ct2_source.json"
GELU = 3  # CTranslate2's Activation.GELU

# CTranslate2 DataType ids (include/ctranslate2/types.h) -> numpy dtype; bfloat16 is widened by hand.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"),
    4: np.dtype("<f2"), 5: np.dtype("<u2"),
}
_BFLOAT16 = 5

# The files of a faster-whisper checkpoint besides model.bin.
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "preprocessor_config.json",
                     "vocabulary.txt", "vocabulary.json")


@dataclass
class Ct2ModelBin:
    """Parsed ``model.bin``: the header plus every variable (dequantised lazily by the converter)."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Cursor:
    """Little-endian reader over the file bytes that turns any overrun into a clear UserError."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = memoryview(data), 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise UserError(f"{self.path} is truncated or corrupt (needs byte {self.pos + n}, "
                            f"file has {len(self.data)}); reinstall the package that provides it.")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.uint("H")))
        if not raw.endswith(b"\0"):
            raise UserError(f"{self.path} is corrupt (a string at byte {self.pos} is not NUL-terminated).")
        return raw[:-1].decode("utf-8", errors="replace")


def _read_header(cur: _Cursor) -> tuple[int, str, int]:
    version = cur.uint("I")
    if not MIN_BINARY_VERSION <= version <= MAX_BINARY_VERSION:
        raise UserError(f"{cur.path} has CTranslate2 binary version {version}; only versions "
                        f"{MIN_BINARY_VERSION}-{MAX_BINARY_VERSION} are supported.")
    return version, cur.string(), cur.uint("I")


def read_ct2_model_bin(path: Path) -> Ct2ModelBin:
    """Parse a CTranslate2 ``model.bin`` (header, variables with shape/dtype, aliases)."""
    path = Path(path)
    cur = _Cursor(path.read_bytes(), path)
    version, spec, revision = _read_header(cur)
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.uint("I")):
        name = cur.string()
        shape = tuple(cur.uint("I") for _ in range(cur.uint("B")))
        type_id, nbytes = cur.uint("B"), cur.uint("I")
        if type_id not in _DTYPES:
            raise UserError(f"{path}: variable '{name}' has unsupported CTranslate2 dtype id {type_id}.")
        dtype = _DTYPES[type_id]
        if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise UserError(f"{path} is corrupt: variable '{name}' of shape {shape} has {nbytes} bytes.")
        array = np.frombuffer(cur.take(nbytes), dtype=dtype).reshape(shape)
        if type_id == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases = {cur.string(): cur.string() for _ in range(cur.uint("I"))}
    return Ct2ModelBin(version, spec, revision, variables, aliases)



def is_ct2_whisper_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a CTranslate2 Whisper checkpoint (cheap: reads only the header)."""
    path = Path(path)
    if not ((path / "model.bin").is_file() and (path / "tokenizer.json").is_file()):
        return False
    try:
        with open(path / "model.bin", "rb") as f:
            head = f.read(4 + 2 + 256 + 4)
        return _read_header(_Cursor(head, path / "model.bin"))[1] == "WhisperSpec"
    except (UserError, OSError):
        return False
