"""Metrics for steered outputs, as seed 002 and its released code report them (§3.3 (iii), §5, App. A.5, A.6).

- Script buckets (released ``utils/codemix_seamless_regex_metrics.py``): every token of an output, with the
  SentencePiece space mark "▁" removed and special tokens ``<...>`` counted as Other, falls in one bucket by
  Unicode script (``regex`` ``\\p{Script=...}``): Mix (Latin and any of Hiragana/Katakana/Han), Latin, CJK
  (Hiragana/Katakana/Han, no Latin), Other (digits, punctuation, other scripts, empty). Tokens come from the
  model's tokenizer when one is passed (``encode(text, add_special_tokens=False)`` then
  ``convert_ids_to_tokens``, as the released code does with the Seamless tokenizer), or from a callable, or else
  from whitespace (default) or single characters. Without the model's tokenizer the numbers are not the
  paper's: whitespace makes an unspaced CJK sentence one token, characters make every Latin letter one.
- Rates: ``p_latin = Latin / (Latin + CJK)`` and ``p_cjk`` ("given pure Latin/CJK": Mix and Other left out;
  Table 1's Latin and CJK columns sum to 100), the half-credit variants that split Mix evenly, per row and
  corpus-weighted (token counts summed over rows first). A row with no Latin or CJK token rates 0, as there.
- Control rate (§3.3): the share of tokens in the target language's script, corpus-weighted by default.
- Language identification (App. A.6 uses fastText ``lid.176.bin``, a model file that must be fetched): here
  ``py3langid`` (langid.py's model ships inside the PyPI package, so it runs offline) with normalised
  probabilities over its 97 languages; like the released ``fasttext_eval.py``, the mean probability of each
  language of interest over the outputs, an empty output counting 0 for every language.
- Cross-modal effect ratio (§3.3, App. A.5): ``CR_T / CR_S``, the control rate in the target modality (text
  repetition) over the one in the source modality the units came from (ASR). Table 3 is exactly this raw ratio
  of Table 1's numbers (e.g. 15.09 / 51.43 = 0.29), not a change against an unsteered baseline; baselines can be
  subtracted from both (optional). Only pairs with ``CR_S > threshold`` get a ratio. The threshold's value is
  lost in our copy of the text; Table 3 keeps every pair with CR_S >= 33.64% and drops every one <= 0.61%, so
  the default 0.10 (10%) reproduces it. A denominator at or below 1e-12 never gives a ratio.
- BLEU / chrF++ (released ``assets/translation_gold/exp2_eval.py``): sacrebleu corpus scores, BLEU with
  ``effective_order=True``, chrF++ with ``char_order=6, word_order=2, beta=2``, and ``0.6 BLEU + 0.4 chrF``;
  pairs whose reference is missing or blank are skipped, as there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import regex
from lalm_probe.core.errors import UserError

Script = Literal["latin", "cjk"]
BUCKETS = ("Latin", "CJK", "Mix", "Other")
_LATIN = regex.compile(r"\p{Script=Latin}")
_CJK = regex.compile(r"[\p{Script=Hiragana}\p{Script=Katakana}\p{Script=Han}]")
_CJK_LANGUAGES = {"ja", "zh", "yue", "wuu"}
_LATIN_LANGUAGES = {"en", "de", "fr", "es", "it", "pt", "nl", "id", "vi", "tr", "pl", "sv", "da", "no", "fi",
                    "cs", "ro", "hu", "ca", "ms", "tl", "sw", "et", "lv", "lt", "sk", "sl", "hr"}
TINY = 1e-12


# ---- script buckets ---------------------------------------------------------------------------------------
def token_bucket(token: str) -> str:
    """Latin, CJK, Mix or Other for one token (the released code's bucketing)."""
    t = token.replace("▁", "")
    if not t or (t.startswith("<") and t.endswith(">")):
        return "Other"
    latin, cjk = _LATIN.search(t) is not None, _CJK.search(t) is not None
    return "Mix" if latin and cjk else "Latin" if latin else "CJK" if cjk else "Other"


def tokens(text: str, tokenizer: Any = None, split: Literal["whitespace", "chars"] = "whitespace") -> list[str]:
    """The tokens of ``text``: from a HF-style tokenizer, a callable, or whitespace / single characters."""
    text = "" if text is None else str(text)
    if tokenizer is not None:
        if hasattr(tokenizer, "encode") and hasattr(tokenizer, "convert_ids_to_tokens"):
            return list(tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False)))
        return list(tokenizer(text))
    if split == "whitespace":
        return text.split()
    if split == "chars":
        return [ch for ch in text if not ch.isspace()]
    raise UserError(f"Unknown split '{split}'. Available: whitespace, chars.")


@dataclass(frozen=True)
class ScriptCounts:
    """Token counts per bucket, and the rates the released code reports from them."""

    latin: int = 0
    cjk: int = 0
    mix: int = 0
    other: int = 0

    def __add__(self, other: "ScriptCounts") -> "ScriptCounts":
        return ScriptCounts(self.latin + other.latin, self.cjk + other.cjk, self.mix + other.mix,
                            self.other + other.other)

    @property
    def total(self) -> int:
        return self.latin + self.cjk + self.mix + self.other

    @property
    def p_latin(self) -> float:
        return _rate(self.latin, self.latin + self.cjk)

    @property
    def p_cjk(self) -> float:
        return _rate(self.cjk, self.latin + self.cjk)

    @property
    def p_latin_half_mix(self) -> float:
        return _rate(self.latin + 0.5 * self.mix, self.latin + self.cjk + self.mix)

    @property
    def p_cjk_half_mix(self) -> float:
        return _rate(self.cjk + 0.5 * self.mix, self.latin + self.cjk + self.mix)

    def rate(self, script: Script) -> float:
        """The share of the target script among pure Latin/CJK tokens."""
        return {"latin": self.p_latin, "cjk": self.p_cjk}[_script(script)]


def script_counts(text: str, tokenizer: Any = None, split: Literal["whitespace", "chars"] = "whitespace"
                  ) -> ScriptCounts:
    """Bucket counts of one output."""
    found = [token_bucket(t) for t in tokens(text, tokenizer, split)]
    return ScriptCounts(*(found.count(b) for b in BUCKETS))


@dataclass(frozen=True)
class ScriptReport:
    """Per-row counts and their corpus-weighted sum."""

    rows: tuple[ScriptCounts, ...]
    corpus: ScriptCounts

    def row_rates(self, script: Script) -> np.ndarray:
        return np.array([r.rate(script) for r in self.rows])


def script_report(texts: Sequence[str], tokenizer: Any = None, split: Literal["whitespace", "chars"] = "whitespace"
                  ) -> ScriptReport:
    """Script buckets of every output and of the whole corpus."""
    rows = tuple(script_counts(t, tokenizer, split) for t in texts)
    return ScriptReport(rows=rows, corpus=sum(rows, ScriptCounts()))


def control_rate(texts: Sequence[str], target: Script, tokenizer: Any = None,
                 split: Literal["whitespace", "chars"] = "whitespace", weighting: Literal["corpus", "row"] = "corpus"
                 ) -> float:
    """Share of tokens in the ``target`` script (Latin vs CJK): corpus-weighted, or the mean of per-row rates."""
    report = script_report(texts, tokenizer, split)
    if weighting == "corpus":
        return report.corpus.rate(target)
    if weighting == "row":
        return float(report.row_rates(target).mean()) if report.rows else 0.0
    raise UserError(f"Unknown weighting '{weighting}'. Available: corpus, row.")


def script_of(language: str) -> Script:
    """The script whose share measures control toward ``language`` (ISO 639-1): 'cjk' for ja/zh, else 'latin'."""
    code = language.lower()
    if code in _CJK_LANGUAGES:
        return "cjk"
    if code in _LATIN_LANGUAGES:
        return "latin"
    raise UserError(f"No Latin/CJK script known for language '{language}': the script control rate covers "
                    f"{', '.join(sorted(_CJK_LANGUAGES | _LATIN_LANGUAGES))}.")


# ---- language identification ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LanguageID:
    """Top language per output ("" for an empty one), and probabilities of the languages of interest."""

    labels: tuple[str, ...]
    languages: tuple[str, ...]
    probabilities: np.ndarray  # (outputs, languages)

    def mean(self) -> dict[str, float]:
        """Mean probability of each language over the outputs (the released fastText table)."""
        means = self.probabilities.mean(axis=0) if len(self.labels) else np.zeros(len(self.languages))
        return dict(zip(self.languages, means.tolist()))

    def share(self, language: str) -> float:
        """Share of outputs whose top language is ``language``."""
        return self.labels.count(language) / len(self.labels) if self.labels else 0.0


@functools.lru_cache(maxsize=1)
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_languages(texts: Sequence[str], languages: Sequence[str]) -> LanguageID:
    """py3langid over every output: its top language and the probabilities of ``languages`` (ISO 639-1)."""
    ident = _identifier()
    known = set(ident.nb_classes)
    unknown = [lang for lang in languages if lang not in known]
    if unknown:
        raise UserError(f"Language(s) {', '.join(unknown)} unknown to the language identifier. "
                        f"It knows: {', '.join(sorted(known))}.")
    labels, probs = [], np.zeros((len(texts), len(languages)))
    for i, text in enumerate(texts):
        clean = " ".join(str(text or "").split())
        if not clean:
            labels.append("")
            continue
        ranked = dict(ident.rank(clean))
        labels.append(max(ranked, key=ranked.__getitem__))
        probs[i] = [ranked.get(lang, 0.0) for lang in languages]
    return LanguageID(labels=tuple(labels), languages=tuple(languages), probabilities=probs)


# ---- cross-modal effect ratio -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EffectRatio:
    """``ratio = numerator / denominator`` when the source effect passes the threshold, else None and why."""

    numerator: float
    denominator: float
    ratio: float | None
    reason: str | None = None


def cross_modal_effect_ratio(source_rate: float, target_rate: float, *, threshold: float = 0.10,
                             source_baseline: float | None = None, target_baseline: float | None = None
                             ) -> EffectRatio:
    """CR_T / CR_S (rates as fractions), only where the source-modality effect CR_S exceeds ``threshold``."""
    num = float(target_rate) - (target_baseline or 0.0)
    den = float(source_rate) - (source_baseline or 0.0)
    if den <= threshold:
        return EffectRatio(num, den, None, f"source effect {den:.4g} is not above the threshold {threshold:g}")
    if den <= TINY:
        return EffectRatio(num, den, None, "source effect is ~0")
    return EffectRatio(num, den, num / den)


def mean_effect_ratio(ratios: Sequence[EffectRatio]) -> float:
    """Mean ratio over the pairs that have one (§5.1's 0.36 and 0.49); NaN when none has."""
    kept = [r.ratio for r in ratios if r.ratio is not None]
    return float(np.mean(kept)) if kept else float("nan")


# ---- translation quality ----------------------------------------------------------------------------------
def translation_quality(hypotheses: Sequence[str], references: Sequence[str | None]) -> dict[str, float]:
    """Corpus BLEU and chrF++ with the released settings, over the pairs that have a reference."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs but {len(references)} references.")
    pairs = [(str(h), str(r)) for h, r in zip(hypotheses, references) if r is not None and str(r).strip()]
    if not pairs:
        raise UserError("No output has a gold reference: BLEU and chrF++ need at least one.")
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    bleu = BLEU(effective_order=True).corpus_score(hyps, [refs]).score
    chrf = CHRF(char_order=6, word_order=2, beta=2, lowercase=False).corpus_score(hyps, [refs]).score
    return {"bleu": bleu, "chrf": chrf, "combined": 0.6 * bleu + 0.4 * chrf, "pairs": float(len(pairs))}


def _rate(x: float, denom: float) -> float:
    return x / denom if denom else 0.0


def _script(script: str) -> Script:
    if script not in ("latin", "cjk"):
        raise UserError(f"Unknown script '{script}'. Available: latin, cjk.")
    return script  # type: ignore[return-value]
