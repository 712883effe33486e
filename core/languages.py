"""One language table: ISO 639-1 codes, ISO 639-3 (SeamlessM4T) codes, English names and espeak-ng voices.

Language labels in this project are ISO 639-1 codes (``en``, ``zh``): the synthetic data, the corpus loaders and
Whisper's language tokens all use them. Models and corpora spell languages differently, so every translation
between spellings goes through this table:

- ``iso3`` is the ISO 639-3 code as SeamlessM4T v2 spells it. Where ISO 639-1 names a macro-language, Seamless
  uses one of its individual languages, and so does this table: Chinese ``cmn`` (Mandarin), Arabic ``arb``
  (Standard Arabic), Persian ``pes`` (Iranian Persian), Swahili ``swh``, Malay ``zsm`` (Standard Malay) and
  Latvian ``lvs`` (Standard Latvian). The macro-language codes (``zho``, ``ara``, ``fas``, ``swa``, ``msa``,
  ``lav``) are accepted as aliases.
- ``name`` is the English name (``Chinese`` for ``zh``, the word AudioLens' label set uses); ``aliases`` are
  other spellings a label or a user may use (``Mandarin``).
- ``espeak`` is the espeak-ng voice that reads the language, for the languages the built-in synthesis supports.
  Mandarin must use ``cmn-latn-pinyin``: the plain cmn/zh voices of espeak-ng 1.51 read the tone digits of
  their dictionary aloud.

Lookups are case-insensitive and take any of these spellings, and regional or corpus tags by their first
subtag (``zh-CN`` from Common Voice and CoVoST, ``en_us`` and ``cmn_hans_cn`` from FLEURS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .errors import UserError, unknown_name


@dataclass(frozen=True)
class Language:
    """One row of the table."""

    iso1: str
    iso3: str
    name: str
    espeak: str | None = None
    aliases: tuple[str, ...] = ()


# The voiced languages come first, in the order `probe data synth --help` lists them.
LANGUAGES: tuple[Language, ...] = (
    Language("en", "eng", "English", "en-us"),
    Language("fr", "fra", "French", "fr-fr"),
    Language("de", "deu", "German", "de"),
    Language("es", "spa", "Spanish", "es"),
    Language("it", "ita", "Italian", "it"),
    Language("ru", "rus", "Russian", "ru"),
    Language("zh", "cmn", "Chinese", "cmn-latn-pinyin", ("zho", "Mandarin", "Mandarin Chinese")),
    Language("ja", "jpn", "Japanese", "ja"),
    Language("ko", "kor", "Korean", "ko"),
    Language("id", "ind", "Indonesian", "id"),
    Language("vi", "vie", "Vietnamese", "vi"),
    Language("pt", "por", "Portuguese"),
    Language("nl", "nld", "Dutch"),
    Language("ar", "arb", "Arabic", aliases=("ara", "Modern Standard Arabic")),
    Language("hi", "hin", "Hindi"),
    Language("tr", "tur", "Turkish"),
    Language("pl", "pol", "Polish"),
    Language("uk", "ukr", "Ukrainian"),
    Language("cs", "ces", "Czech"),
    Language("sv", "swe", "Swedish"),
    Language("fi", "fin", "Finnish"),
    Language("da", "dan", "Danish"),
    Language("el", "ell", "Greek"),
    Language("he", "heb", "Hebrew"),
    Language("hu", "hun", "Hungarian"),
    Language("ro", "ron", "Romanian"),
    Language("th", "tha", "Thai"),
    Language("bn", "ben", "Bengali", aliases=("Bangla",)),
    Language("fa", "pes", "Persian", aliases=("fas", "Farsi")),
    Language("ur", "urd", "Urdu"),
    Language("ta", "tam", "Tamil"),
    Language("te", "tel", "Telugu"),
    Language("sw", "swh", "Swahili", aliases=("swa",)),
    Language("ca", "cat", "Catalan"),
    Language("et", "est", "Estonian"),
    Language("ms", "zsm", "Malay", aliases=("msa",)),
    Language("tl", "tgl", "Tagalog"),
    Language("bg", "bul", "Bulgarian"),
    Language("sk", "slk", "Slovak"),
    Language("sl", "slv", "Slovenian", aliases=("Slovene",)),
    Language("hr", "hrv", "Croatian"),
    Language("sr", "srp", "Serbian"),
    Language("lt", "lit", "Lithuanian"),
    Language("lv", "lvs", "Latvian", aliases=("lav",)),
    Language("mt", "mlt", "Maltese"),
    Language("cy", "cym", "Welsh"),
    Language("ga", "gle", "Irish"),
    Language("is", "isl", "Icelandic"),
)


@lru_cache(maxsize=1)
def _index() -> dict[str, Language]:
    """Every accepted spelling, lower-cased, -> its language."""
    index: dict[str, Language] = {}
    for lang in LANGUAGES:
        for key in (lang.iso1, lang.iso3, lang.name, *lang.aliases):
            index.setdefault(key.lower(), lang)  # tests check that no spelling names two languages
    return index


def find(code: str) -> Language | None:
    """The language ``code`` spells (``de``, ``deu``, ``German``, ``zh-CN``, ``cmn_hans_cn``), or None if unknown."""
    key = str(code).strip().lower()
    index = _index()
    if key in index:
        return index[key]
    head = re.split(r"[-_]", key, maxsplit=1)[0]
    return index.get(head) if head != key else None


def lookup(code: str) -> Language:
    """The language ``code`` spells; an unknown code is a ``UserError`` listing the ISO 639-1 codes known."""
    lang = find(code)
    if lang is None:
        raise unknown_name("language", str(code), [lang.iso1 for lang in LANGUAGES])
    return lang


def to_iso1(code: str) -> str:
    """ISO 639-1 code of any spelling: ``deu`` -> ``de``, ``cmn`` -> ``zh``, ``English`` -> ``en``."""
    return lookup(code).iso1


def to_iso3(code: str) -> str:
    """ISO 639-3 code as SeamlessM4T spells it: ``de`` -> ``deu``, ``zh`` -> ``cmn``, ``fa`` -> ``pes``."""
    return lookup(code).iso3


def english_name(code: str) -> str:
    """English name of any spelling: ``zh`` -> ``Chinese``, ``deu`` -> ``German``."""
    return lookup(code).name


def label_code(code: str) -> str:
    """The language label for a corpus' code: ISO 639-1 where the table knows the language (``en_us`` -> ``en``,
    ``zh-CN`` -> ``zh``), else the code's first subtag, lower-cased (``yue_hant_hk`` -> ``yue``)."""
    lang = find(code)
    return lang.iso1 if lang else re.split(r"[-_]", str(code).strip(), maxsplit=1)[0].lower()


def espeak_voices() -> dict[str, str]:
    """ISO 639-1 code -> espeak-ng voice, for every language the built-in synthesis can read."""
    return {lang.iso1: lang.espeak for lang in LANGUAGES if lang.espeak}


def espeak_voice(code: str) -> str:
    """The espeak-ng voice for a language; a ``UserError`` when it has none here."""
    lang = lookup(code)
    if not lang.espeak:
        raise UserError(f"Language '{code}' ({lang.name}) has no espeak-ng voice here; "
                        f"voiced: {', '.join(espeak_voices())}.")
    return lang.espeak
