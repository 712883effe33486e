"""Tiny, seeded, randomly initialised instances of real architectures for smoke tests and plugin authors.

A model plugin supplies a builder that saves a tiny model and its offline processor to a directory; this module
caches the result so the plugin then loads it through its ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from .files import cache_dir, publish_dir, temp_dir_for

TINY_VERSION = "2"  # bump when a builder changes, so stale caches are not reused


def tiny_checkpoint(name: str, build: Callable[[Path], None]) -> Path:
    """Build once into the cache (atomically: a half-built folder is never picked up) and return its path."""
    target = cache_dir() / "tiny" / f"{name}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    tmp = temp_dir_for(target)
    try:
        build(tmp)
        if not (target / "config.json").is_file():  # another process may have finished the same build first
            publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def byte_level_tokenizer(cls: Any, specials: Sequence[str], pad: str = "<|endoftext|>") -> Any:
    """A byte-level BPE tokenizer with no merges: one token per byte, never unknown, needs no files."""
    from tokenizers import pre_tokenizers

    vocab = {pad: 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    tok = cls(vocab=vocab, merges=[], unk_token=pad, eos_token=pad, pad_token=pad)
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok
