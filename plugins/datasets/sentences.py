"""The built-in sentence table (sentences.tsv): parallel sentences in 11 languages and English paraphrase pairs.

Synthesis renders them; the semantic-hub analysis counts their tokens when a dataset has no text of its own.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Iterable

from lalm_probe.core.errors import unknown_name

SENTENCE_SETS = ("parallel", "paraphrase", "all")


@dataclass(frozen=True)
class Sentence:
    """One row of the built-in table; ``spoken`` is what espeak-ng is given when it differs from ``text``."""

    semantic_id: str
    language: str
    text: str
    spoken: str
    paraphrase_of: str | None


@lru_cache(maxsize=1)
def load_sentences() -> tuple[Sentence, ...]:
    """The built-in parallel sentences and English paraphrase pairs (plugins/datasets/sentences.tsv)."""
    raw = resources.files(__package__).joinpath("sentences.tsv").read_text(encoding="utf-8")
    rows = csv.DictReader((ln for ln in raw.splitlines() if not ln.startswith("#")), delimiter="\t",
                          quoting=csv.QUOTE_NONE)
    return tuple(Sentence(r["semantic_id"], r["language"], r["text"], r["spoken"] or r["text"],
                          r["paraphrase_of"] or None) for r in rows)


def table_digest() -> str:
    """A short hash of the whole table, part of cache keys: an edited sentence is rendered again."""
    return hashlib.sha256(repr(load_sentences()).encode()).hexdigest()[:12]


def select_sentences(sentence_ids: Iterable[str] | None) -> list[str]:
    """Expand set names (parallel, paraphrase, all) and check ids; keeps the table's order."""
    table = load_sentences()
    order = list(dict.fromkeys(s.semantic_id for s in table))
    para = {s.semantic_id for s in table if s.paraphrase_of}
    wanted: set[str] = set()
    for sid in sentence_ids or ["parallel"]:
        if sid == "parallel":
            wanted |= set(order) - para
        elif sid == "paraphrase":
            wanted |= para
        elif sid == "all":
            wanted |= set(order)
        elif sid in order:
            wanted.add(sid)
        else:
            raise unknown_name("sentence id", sid, [*SENTENCE_SETS, *order])
    return [sid for sid in order if sid in wanted]
