"""The math of the hub analysis: pure functions on arrays, tested against reference implementations."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from lalm_probe.core.errors import UserError
from lalm_probe.core.files import cache_dir
from lalm_probe.core.languages import label_code
from lalm_probe.plugins.datasets.sentences import load_sentences
from scipy import stats
from scipy.special import softmax


# ---- (a) baseline-adjusted cosine ------------------------------------------------------------------------
def cosine_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cos(x_a, y_b) for all rows a of x and b of y (zero vectors give 0)."""
    def unit(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        n = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.where(n > 0, n, 1.0)

    return unit(x) @ unit(y).T


def adjusted_scores(sim: np.ndarray) -> tuple[np.ndarray, float]:
    """Eq. 1 on an n×n similarity matrix whose diagonal holds the matched pairs.

    Returns the per-pair scores ``sim[i, i] − off`` and ``off`` = mean of the n(n−1) off-diagonal entries.
    """
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"Eq. 1 needs a square matrix of at least 2x2 pairs; got {sim.shape}.")
    diag = np.diag(sim)
    off = (sim.sum() - diag.sum()) / (n * (n - 1))
    return diag - off, float(off)


def baseline_adjusted_cosine(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-pair baseline-adjusted cosine for matched rows of x and y, and the non-matching baseline."""
    return adjusted_scores(cosine_matrix(x, y))


def mean_ci(values: np.ndarray, level: float = 0.95, method: str = "t", seed: int = 0
            ) -> tuple[float, float, float]:
    """Mean and confidence interval over pairs (t-interval or percentile bootstrap)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2 or np.ptp(v) == 0:
        return m, m, m
    if method == "bootstrap":
        res = stats.bootstrap((v,), np.mean, confidence_level=level, n_resamples=2000, method="percentile",
                              rng=np.random.default_rng(seed))
        return m, float(res.confidence_interval.low), float(res.confidence_interval.high)
    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return m, m - half, m + half


# ---- (b) token-language distribution ---------------------------------------------------------------------
def count_tokens(tokenizer: Any, texts: dict[str, Sequence[str]], vocab_size: int) -> tuple[list[str], np.ndarray]:
    """Languages (sorted) and a (vocab, languages) table of token counts; ids ≥ vocab_size are ignored."""
    langs = sorted(texts)
    counts = np.zeros((vocab_size, len(langs)))
    for j, lang in enumerate(langs):
        for text in texts[lang]:
            ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=int)
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            np.add.at(counts[:, j], ids, 1)
    return langs, counts


TABLE_VERSION = "1"  # bump when the counting changes, so cached tables are rebuilt
# Languages written without spaces between words: a word is tokenized bare; in the others it follows a space.
NO_SPACES = frozenset({"zh", "ja", "th", "lo", "km", "my", "yue", "bo"})


def wordfreq_languages() -> list[str]:
    """The languages the offline ``wordfreq`` package has a word list for (its codes, ISO 639-1 where one
    exists)."""
    import wordfreq

    return sorted(wordfreq.available_languages())


def _word_initial_marker(tokenizer: Any) -> bool:
    """Whether the tokenizer marks a word's start itself (SentencePiece's ``▁``), so a bare word already tokenizes
    as it does after a space in running text; byte-level BPE (GPT-2, Whisper, Qwen) needs the space."""
    try:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    except (AttributeError, TypeError, KeyError):
        return False
    return bool(pieces) and str(pieces[0]).startswith("\u2581")


def encode_words(tokenizer: Any, words: Sequence[str], spaced: bool, marker: bool = False) -> list[list[int]]:
    """Token ids of each word as it appears in running text: after a space where the language separates words
    with spaces (bare where the tokenizer marks word starts itself), bare otherwise.

    Spaced words go through a fast tokenizer as one text, `` w1 w2 ...``, and each token is assigned to the word
    its characters fall in: tokenizers split at spaces before merging (byte-level BPE's pre-tokenizer,
    SentencePiece's whitespace split), so this equals tokenizing each word alone, and is about 5x faster.
    """
    if not words:
        return []
    if spaced and getattr(tokenizer, "is_fast", False):
        starts, text = [], ""
        for w in words:
            starts.append(len(text) + 1)
            text += " " + w
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            enc = None
        if enc is not None:
            ends = np.array([e for _, e in enc["offset_mapping"]], dtype=np.int64).reshape(-1)
            # word k owns the space before it: a lone space token belongs to the word it precedes
            which = np.maximum(np.searchsorted(np.array(starts) - 1, np.maximum(ends - 1, 0), side="right") - 1, 0)
            ids = np.asarray(enc["input_ids"], dtype=np.int64)
            return [list(part) for part in np.split(ids, np.searchsorted(which, np.arange(1, len(words))))]
    texts = [(" " + w) if spaced and not marker else w for w in words]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def wordfreq_counts(tokenizer: Any, languages: Sequence[str], vocab_size: int, words: int = 10000
                    ) -> tuple[list[str], np.ndarray]:
    """Languages (sorted) and a (vocab, languages) table of token counts from the ``wordfreq`` word lists.

    Each language's ``words`` most frequent words are tokenized as they appear in running text (after a space,
    except in languages written without spaces, or where the tokenizer marks word starts itself) and every token
    of a word counts the word's frequency: an estimate of token frequencies in that language's text that needs
    neither a corpus nor the data being analysed. Ids >= ``vocab_size`` are ignored.
    """
    import wordfreq

    langs = sorted(languages)
    where = _cache_file(tokenizer, langs, vocab_size, words)
    if where is not None and where.is_file():
        with np.load(where) as cached:
            return langs, cached["counts"]
    marker = _word_initial_marker(tokenizer)
    counts = np.zeros((vocab_size, len(langs)))
    for j, lang in enumerate(langs):
        freq = wordfreq.get_frequency_dict(lang)
        top = wordfreq.top_n_list(lang, words)
        encoded = encode_words(tokenizer, top, lang not in NO_SPACES, marker)
        ids = np.fromiter((i for enc in encoded for i in enc), dtype=np.int64)
        weights = np.repeat([freq.get(w, 0.0) for w in top], [len(enc) for enc in encoded])
        ok = (ids >= 0) & (ids < vocab_size)
        counts[:, j] = np.bincount(ids[ok], weights=weights[ok], minlength=vocab_size)[:vocab_size]
    if where is not None:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, counts=counts)
        os.replace(tmp, where)
    return langs, counts


def _cache_file(tokenizer: Any, langs: list[str], vocab_size: int, words: int) -> Path | None:
    """Where a wordfreq table is cached: named by everything it depends on (the tokenizer's full definition,
    the languages, the word count, wordfreq's version); None for a tokenizer that cannot be fingerprinted."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    except (AttributeError, TypeError, ValueError):
        return None
    key = json.dumps([type(tokenizer).__name__, definition, langs, vocab_size, words, metadata.version("wordfreq"),
                      sorted(NO_SPACES), TABLE_VERSION])
    return cache_dir() / "token_tables" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def language_given_token(counts: np.ndarray) -> np.ndarray:
    """p(language | token) with a uniform language prior, masked where a token never occurs in a language.

    Rows of tokens seen in no language are uniform. Each row sums to 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=0)
    seen = counts > 0
    with np.errstate(divide="ignore"):
        logp = np.where(seen, np.log(np.where(seen, counts, 1.0)) - np.log(np.where(totals > 0, totals, 1.0)),
                        -np.inf)
    out = np.full(counts.shape, 1.0 / counts.shape[1])
    rows = seen.any(axis=1)
    out[rows] = softmax(logp[rows], axis=1)
    return out


def language_given_hidden(logits: np.ndarray, table: np.ndarray) -> np.ndarray:
    """p(language | h) = Σ_w p_lens(w|h)·p(language|w), with the lens distribution truncated to the table's
    vocabulary and renormalised (softmax of the truncated logits). Rows sum to 1."""
    v = table.shape[0]
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[-1] < v:
        raise ValueError(f"The lens gives {logits.shape[-1]} logits but the token table has {v} tokens.")
    return softmax(logits[..., :v], axis=-1) @ table


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row."""
    p = np.asarray(p, dtype=np.float64)
    return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)).sum(axis=-1)


def read_corpus(path: str | Path) -> dict[str, list[str]]:
    """Texts per language from ``language<TAB>text`` lines or JSONL objects with ``language`` and ``text``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hub: corpus file not found: {p}")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                lang, text = obj["language"], obj["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{p}, line {n}: expected a JSON object with 'language' and 'text'.") from None
        else:
            lang, tab, text = line.partition("\t")
            if not tab:
                raise UserError(f"{p}, line {n}: expected 'language<TAB>text'.")
        out.setdefault(str(lang).strip(), []).append(str(text))
    if not out:
        raise UserError(f"hub: corpus file {p} holds no text.")
    return out


def builtin_texts(wanted: Iterable[str] | None = None) -> dict[str, list[str]]:
    """The built-in sentences per language: every language, or the ``wanted`` ones under the dataset's own
    spelling (labels ``en``, ``eng`` and ``English`` all get the English sentences)."""
    by_code: dict[str, list[str]] = {}
    for s in load_sentences():
        by_code.setdefault(s.language, []).append(s.text)
    if wanted is None:
        return by_code
    return {label: list(by_code[label_code(label)]) for label in wanted if label_code(label) in by_code}


