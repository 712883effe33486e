"""Steering output metrics: script buckets, control rate, offline language ID, effect ratio, BLEU / chrF++."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.output_metrics import (
    ScriptCounts,
    control_rate,
    cross_modal_effect_ratio,
    identify_languages,
    mean_effect_ratio,
    script_counts,
    script_of,
    script_report,
    token_bucket,
    tokens,
    translation_quality,
)


class PieceTokenizer:
    """A SentencePiece-like tokenizer with a fixed vocabulary, the interface the released code uses."""

    vocab = ["▁in", "▁entwick", "elten", "▁Länd", "ern", "▁很", "少", "<unk>", "▁", "2024", "sie很"]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False  # the released code encodes without special tokens
        ids, rest = [], text.replace(" ", "▁")
        rest = rest if rest.startswith("▁") else "▁" + rest
        while rest:
            match = max((p for p in self.vocab if rest.startswith(p)), key=len, default=None)
            ids.append(self.vocab.index(match) if match else self.vocab.index("<unk>"))
            rest = rest[len(match):] if match else rest[1:]
        return ids

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]


@pytest.mark.parametrize("token, bucket", [
    ("Haus", "Latin"), ("▁Länder", "Latin"), ("これ", "CJK"), ("カタカナ", "CJK"), ("漢字", "CJK"),
    ("これはtest", "Mix"), ("sie很", "Mix"), ("2024", "Other"), ("。", "Other"), ("<unk>", "Other"), ("▁", "Other"),
    ("Привет", "Other"), ("한국어", "Other"),
])
def test_each_token_falls_in_one_script_bucket(token: str, bucket: str) -> None:
    assert token_bucket(token) == bucket


def test_tokens_come_from_a_tokenizer_a_callable_or_whitespace_or_characters() -> None:
    assert tokens("in entwickelten Ländern 很少", PieceTokenizer()) == ["▁in", "▁entwick", "elten", "▁Länd", "ern",
                                                                       "▁很", "少"]
    assert tokens("ab cd", str.split) == ["ab", "cd"]
    assert tokens("Das ist 很少") == ["Das", "ist", "很少"]
    assert tokens("Das 很少", split="chars") == ["D", "a", "s", "很", "少"]
    with pytest.raises(UserError, match="Unknown split"):
        tokens("x", split="bpe")  # type: ignore[arg-type]


def test_a_mixed_sentence_through_the_tokenizer_counts_its_pieces() -> None:
    counts = script_counts("in entwickelten Ländern 很少 2024", PieceTokenizer())
    assert counts == ScriptCounts(latin=5, cjk=2, mix=0, other=2)  # "▁" and "2024": no letters
    assert counts.p_latin == pytest.approx(5 / 7) and counts.p_cjk == pytest.approx(2 / 7)


def test_rates_leave_out_mix_and_other_or_split_mix_in_half() -> None:
    c = ScriptCounts(latin=2, cjk=1, mix=2, other=5)
    assert (c.p_latin, c.p_cjk) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert (c.p_latin_half_mix, c.p_cjk_half_mix) == (pytest.approx(3 / 5), pytest.approx(2 / 5))
    assert ScriptCounts(other=3).p_latin == 0.0  # no Latin or CJK token: rate 0, as the released code


def test_control_rate_is_corpus_weighted_or_a_mean_of_rows() -> None:
    texts = ["a b c d", "漢字", "これ は ペン"]
    report = script_report(texts)
    assert [r.cjk for r in report.rows] == [0, 1, 3] and report.corpus.total == 8
    assert control_rate(texts, "cjk") == pytest.approx(4 / 8)
    assert control_rate(texts, "cjk", weighting="row") == pytest.approx((0 + 1 + 1) / 3)
    assert control_rate(texts, "latin", split="chars") == pytest.approx(4 / 11)
    with pytest.raises(UserError, match="Unknown script"):
        control_rate(texts, "cyrillic")  # type: ignore[arg-type]


def test_the_target_script_follows_the_language() -> None:
    assert [script_of(c) for c in ("ja", "zh", "de", "fr", "es")] == ["cjk", "cjk", "latin", "latin", "latin"]
    with pytest.raises(UserError, match="No Latin/CJK script"):
        script_of("ru")


def test_offline_language_id_names_clear_sentences_in_five_languages() -> None:
    texts = {"de": "Heute gehen wir mit den Kindern in den Park und essen danach ein Eis.",
             "fr": "Nous allons au marché ce matin pour acheter du pain et des fromages.",
             "es": "Mañana vamos a visitar a mis abuelos que viven cerca de la playa.",
             "ja": "今日はとても良い天気なので、公園へ散歩に行きましょう。",
             "zh": "我们明天早上去图书馆看书，然后一起吃午饭。"}
    result = identify_languages(list(texts.values()) + [""], languages=list(texts))
    assert result.labels == tuple(texts) + ("",)
    for i, lang in enumerate(texts):
        assert result.probabilities[i, i] > 0.5
    assert result.probabilities[-1].tolist() == [0.0] * 5  # an empty output counts 0 for every language
    assert result.mean()["de"] == pytest.approx(result.probabilities[:, 0].mean())
    assert result.share("ja") == pytest.approx(1 / 6)
    with pytest.raises(UserError, match="unknown to the language identifier"):
        identify_languages(["x"], languages=["xx"])


# Seed 002 Table 1 (control rates in %, target script): (task language, intervention, step) -> (ASR, TR)
TABLE_1 = {
    ("de", "ja", 1): (0.00, 0.00), ("de", "zh", 1): (0.00, 0.00), ("fr", "ja", 1): (0.00, 0.00),
    ("fr", "zh", 1): (0.00, 0.00), ("ja", "de", 1): (0.10, 0.55), ("ja", "fr", 1): (0.10, 0.59),
    ("zh", "de", 1): (0.55, 1.89), ("zh", "fr", 1): (0.61, 2.19),
    ("de", "ja", 6): (60.85, 14.16), ("de", "zh", 6): (74.96, 16.75), ("fr", "ja", 6): (65.34, 10.34),
    ("fr", "zh", 6): (77.73, 30.70), ("ja", "de", 6): (89.28, 63.12), ("ja", "fr", 6): (33.64, 11.48),
    ("zh", "de", 6): (91.69, 50.47), ("zh", "fr", 6): (51.43, 15.09),
    ("de", "ja", 11): (83.32, 22.89), ("de", "zh", 11): (85.81, 31.67), ("fr", "ja", 11): (86.76, 25.96),
    ("fr", "zh", 11): (89.49, 50.85), ("ja", "de", 11): (95.43, 77.08), ("ja", "fr", 11): (43.78, 24.03),
    ("zh", "de", 11): (95.58, 58.96), ("zh", "fr", 11): (71.60, 31.15),
}
# Seed 002 Table 3 (cross-modal effect ratios, two decimals)
TABLE_3 = {("zh", "fr", 6): 0.29, ("zh", "de", 6): 0.55, ("fr", "zh", 6): 0.39, ("fr", "ja", 6): 0.16,
           ("de", "zh", 6): 0.22, ("de", "ja", 6): 0.23, ("ja", "fr", 6): 0.34, ("ja", "de", 6): 0.71,
           ("zh", "fr", 11): 0.44, ("zh", "de", 11): 0.62, ("fr", "zh", 11): 0.57, ("fr", "ja", 11): 0.30,
           ("de", "zh", 11): 0.37, ("de", "ja", 11): 0.27, ("ja", "fr", 11): 0.55, ("ja", "de", 11): 0.81}


def test_effect_ratio_reproduces_seed_002_table_3_from_table_1() -> None:
    ratios = {key: cross_modal_effect_ratio(asr / 100, tr / 100) for key, (asr, tr) in TABLE_1.items()}
    kept = {key: r.ratio for key, r in ratios.items() if r.ratio is not None}
    assert set(kept) == set(TABLE_3)  # the source threshold drops every t = 1 pair and keeps all later ones
    for key, expected in TABLE_3.items():
        assert round(kept[key], 2) == pytest.approx(expected, abs=1e-9), key
    by_step = {t: [r for (_, _, step), r in ratios.items() if step == t] for t in (1, 6, 11)}
    assert math.isnan(mean_effect_ratio(by_step[1]))
    assert round(mean_effect_ratio(by_step[6]), 2) == 0.36 and round(mean_effect_ratio(by_step[11]), 2) == 0.49


def test_effect_ratio_reports_numerator_and_denominator_and_guards_zero() -> None:
    r = cross_modal_effect_ratio(0.5, 0.2)
    assert (r.numerator, r.denominator, r.ratio) == (0.2, 0.5, pytest.approx(0.4))
    weak = cross_modal_effect_ratio(0.05, 0.04)
    assert weak.ratio is None and "threshold" in weak.reason and weak.denominator == 0.05
    zero = cross_modal_effect_ratio(0.0, 0.3, threshold=-1.0)
    assert zero.ratio is None and "~0" in zero.reason
    relative = cross_modal_effect_ratio(0.6, 0.3, source_baseline=0.1, target_baseline=0.05)
    assert relative.ratio == pytest.approx(0.25 / 0.5)


def test_bleu_and_chrf_plus_plus_equal_sacrebleu_with_the_released_settings() -> None:
    hyps = ["the cat sat", "a dog runs in the park today", "ignored"]
    refs = ["the cat sat down", "the dog runs in the park", "  "]
    got = translation_quality(hyps, refs)
    assert got["pairs"] == 2  # the blank reference is skipped
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps[:2], [refs[:2]], use_effective_order=True).score)
    chrf_pp = sacrebleu.corpus_chrf(hyps[:2], [refs[:2]], char_order=6, word_order=2, beta=2).score
    assert got["chrf"] == pytest.approx(chrf_pp) and got["chrf"] != pytest.approx(
        sacrebleu.corpus_chrf(hyps[:2], [refs[:2]]).score)  # word bigrams count: chrF++, not chrF
    assert got["combined"] == pytest.approx(0.6 * got["bleu"] + 0.4 * got["chrf"])
    assert translation_quality(["the cat"], ["the cat"])["bleu"] == pytest.approx(100.0)  # effective order
    with pytest.raises(UserError, match="No output has a gold reference"):
        translation_quality(["x"], [None])
