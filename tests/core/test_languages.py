"""The one language table: round trips between spellings, Seamless's codes, corpus tags and clear errors."""

from __future__ import annotations

import pytest
from lalm_probe.core import languages
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import (
    LANGUAGES,
    english_name,
    espeak_voice,
    espeak_voices,
    find,
    label_code,
    to_iso1,
    to_iso3,
)

# What the SeamlessM4T v2 plugin mapped before it used this table (ISO 639-1 and English names): still covered.
SEAMLESS = {
    "en": "eng", "fr": "fra", "de": "deu", "es": "spa", "zh": "cmn", "ja": "jpn", "id": "ind", "it": "ita",
    "ko": "kor", "ru": "rus", "vi": "vie", "pt": "por", "nl": "nld", "ar": "arb", "hi": "hin", "tr": "tur",
    "pl": "pol", "uk": "ukr", "cs": "ces", "sv": "swe", "fi": "fin", "da": "dan", "el": "ell", "he": "heb",
    "hu": "hun", "ro": "ron", "th": "tha", "bn": "ben", "fa": "pes", "ur": "urd", "ta": "tam", "te": "tel",
    "sw": "swh", "ca": "cat", "et": "est", "ms": "zsm", "tl": "tgl", "bg": "bul", "sk": "slk", "sl": "slv",
    "hr": "hrv", "sr": "srp", "lt": "lit", "lv": "lvs", "mt": "mlt", "cy": "cym", "ga": "gle", "is": "isl",
}
SEAMLESS_NAMES = {"english": "eng", "french": "fra", "german": "deu", "spanish": "spa", "chinese": "cmn",
                  "mandarin": "cmn", "japanese": "jpn", "indonesian": "ind", "italian": "ita", "korean": "kor",
                  "russian": "rus", "vietnamese": "vie", "portuguese": "por", "dutch": "nld", "arabic": "arb",
                  "hindi": "hin", "turkish": "tur", "polish": "pol", "ukrainian": "ukr"}


def test_every_code_and_name_round_trips():
    for lang in LANGUAGES:
        assert to_iso1(to_iso3(lang.iso1)) == lang.iso1
        assert to_iso3(to_iso1(lang.iso3)) == lang.iso3
        assert to_iso1(english_name(lang.iso1)) == lang.iso1
        assert {to_iso1(a) for a in lang.aliases} <= {lang.iso1}


def test_no_spelling_names_two_languages():
    spellings = [s.lower() for lang in LANGUAGES for s in (lang.iso1, lang.iso3, lang.name, *lang.aliases)]
    assert len(spellings) == len(set(spellings))
    assert all(len(lang.iso1) == 2 and len(lang.iso3) == 3 for lang in LANGUAGES)


def test_table_covers_what_seamless_needs_with_its_macro_language_choices():
    assert {iso1: to_iso3(iso1) for iso1 in SEAMLESS} == SEAMLESS
    assert {name: to_iso3(name) for name in SEAMLESS_NAMES} == SEAMLESS_NAMES
    for macro, individual in {"zho": "cmn", "ara": "arb", "fas": "pes", "swa": "swh", "msa": "zsm", "lav": "lvs"}.items():
        assert to_iso3(macro) == individual


@pytest.mark.parametrize("spelling, iso1", [
    ("de", "de"), ("DEU", "de"), ("German", "de"), ("cmn", "zh"), ("Mandarin", "zh"), ("zh-CN", "zh"),
    ("en_us", "en"), ("cmn_hans_cn", "zh"), ("sv-SE", "sv"), ("  fr ", "fr"),
])
def test_any_spelling_and_regional_tag_finds_the_language(spelling, iso1):
    assert to_iso1(spelling) == iso1


def test_english_names_are_audiolens_words():
    assert [english_name(c) for c in ("en", "de", "es", "fr", "it", "zh", "ja", "ko")] == [
        "English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean"]


def test_unknown_codes_are_one_line_user_errors_listing_the_known_ones():
    for fn in (to_iso1, to_iso3, english_name):
        with pytest.raises(UserError, match=r"Unknown language 'xx'\..*Available: .*\ben\b") as info:
            fn("xx")
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="Did you mean 'de'"):
        to_iso3("dee")
    assert find("xx") is None and find("yue_hant_hk") is None


def test_label_codes_for_corpora_keep_unknown_languages_by_their_first_subtag():
    assert [label_code(c) for c in ("en_us", "zh-CN", "cmn_hans_cn", "es_419", "EN")] == ["en", "zh", "zh", "es", "en"]
    assert [label_code(c) for c in ("yue_hant_hk", "fil_ph", "ast")] == ["yue", "fil", "ast"]


def test_espeak_voices_are_what_synthesis_was_built_with():
    assert espeak_voices() == {"en": "en-us", "fr": "fr-fr", "de": "de", "es": "es", "it": "it", "ru": "ru",
                               "zh": "cmn-latn-pinyin", "ja": "ja", "ko": "ko", "id": "id", "vi": "vi"}
    assert espeak_voice("cmn") == "cmn-latn-pinyin"
    with pytest.raises(UserError, match="'pt' \\(Portuguese\\) has no espeak-ng voice"):
        espeak_voice("pt")
    assert languages.lookup("Farsi").iso1 == "fa"
