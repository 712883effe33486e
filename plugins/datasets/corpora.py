"""Public speech corpora, read from a local copy in the corpus' own layout: no downloads, no `datasets`.

Users already have these corpora on disk as their publishers ship them, so each loader reads that layout
directly and returns a Dataset of audio paths and labels (decoding waits for ``audio.load_audio``). Labels use
the names the synthetic data uses (language as an ISO code, gender as male/female, semantic_id for items that
say the same thing) so one analysis runs on either. ``--data fleurs:/path?split=dev&languages=en_us,fr_fr``.
"""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.core.languages import find, label_code


def split_spec(arg: str) -> tuple[str, dict[str, str]]:
    """Split ``'path?key=value&key=a,b'`` into the path and its options."""
    head, _, query = arg.partition("?")
    opts: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"Option '{part}' in '{arg}' must look like key=value.")
        opts[key.strip()] = value.strip()
    return head.strip(), opts


def _parse(arg: str, source: str, allowed: Iterable[str]) -> tuple[Path, dict[str, str]]:
    path, opts = split_spec(arg)
    allowed = {*allowed, "limit"}
    for key in opts:
        if key not in allowed:
            raise UserError(f"Unknown option '{key}' for {source}. Allowed: {', '.join(sorted(allowed))}.")
    if not path:
        raise UserError(f"{source} needs the path of a local copy, e.g. {source}:/data/{source}.")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{source}: folder not found: {root}")
    return root, opts


def _values(opts: dict[str, str], key: str, default: list[str] | None = None) -> list[str] | None:
    if key not in opts:
        return default
    return [v.strip() for v in opts[key].split(",") if v.strip()]


def _flag(opts: dict[str, str], key: str) -> bool:
    return opts.get(key, "no").lower() in ("1", "yes", "true", "on")


def _finish(items: list[Stimulus], opts: dict[str, str], name: str, root: Path) -> Dataset:
    if "limit" in opts:
        if not opts["limit"].isdigit():
            raise UserError(f"{name}: limit must be a whole number, got '{opts['limit']}'.")
        items = items[: int(opts["limit"])]
    if not items:
        raise UserError(f"{name}: no items matched in {root} with options {opts or 'none'}.")
    return Dataset(items, name=name)


def _layout_error(source: str, root: Path, expected: str) -> UserError:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} entries)" if len(found) > 12 else "")
    return UserError(f"{root} does not look like {source}: expected {expected}; found: {shown or 'an empty folder'}.")


def _read_tsv(path: Path) -> list[dict[str, str]]:
    """Common Voice / CoVoST TSVs: header row, tab-separated, quotes are literal text, backslash escapes."""
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\"))


def _text_id(prefix: str, text: str) -> str:
    """A semantic id for corpora without one: the same normalised sentence gets the same id."""
    norm = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return f"{prefix}-{hashlib.sha1(norm.encode()).hexdigest()[:10]}"


def _gender(value: str) -> str | None:
    """F/M (VCTK), MALE/FEMALE (FLEURS), male_masculine (newer Common Voice) -> male/female/other."""
    v = value.strip().lower()
    if v in ("f", "female") or v.startswith("female"):
        return "female"
    if v in ("m", "male") or v.startswith("male"):
        return "male"
    return "other" if v == "other" else None


# --- FLEURS ----------------------------------------------------------------------------------------------

_FLEURS_SPLITS = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}


def load_fleurs(arg: str) -> Dataset:
    """FLEURS as in the google/fleurs repo: ``<lang>/{train,dev,test}.tsv`` plus ``<lang>/audio/<split>/*.wav``.

    The numeric id names the FLoRes sentence, so it becomes ``semantic_id``: FLEURS is n-way parallel.
    Options: split (train/dev/test, comma list; default test), languages (en_us or en), text (add one text
    item per sentence and language), transcription (the text items' text: ``normalized``, the default, as Lee et
    al. use it (seed 001 App. C), or ``raw``), limit. Speech items carry both: ``transcript`` (raw) and
    ``transcript_normalized``.
    """
    root, opts = _parse(arg, "fleurs", ["split", "languages", "text", "transcription"])
    which = opts.get("transcription", "normalized")
    if which not in ("normalized", "raw"):
        raise UserError(f"fleurs: transcription must be normalized or raw, got '{which}'.")
    base = root / "data" if (root / "data").is_dir() else root
    has_tsv = lambda d: any((d / f"{s}.tsv").is_file() for s in ("train", "dev", "test"))  # noqa: E731
    lang_dirs = [base] if has_tsv(base) else sorted(d for d in base.iterdir() if d.is_dir() and has_tsv(d))
    if not lang_dirs:
        raise _layout_error("FLEURS", root,
                            "<lang>/{train,dev,test}.tsv and <lang>/audio/<split>/*.wav (google/fleurs)")
    wanted = _values(opts, "languages")
    if wanted:
        known = {d.name for d in lang_dirs}
        lang_dirs = [d for d in lang_dirs if d.name in wanted or label_code(d.name) in wanted]
        if not lang_dirs:
            raise UserError(f"fleurs: none of {', '.join(wanted)} in {base}; found: {', '.join(sorted(known))}.")
    splits = []
    for s in _values(opts, "split", ["test"]) or []:
        if s not in _FLEURS_SPLITS:
            raise UserError(f"fleurs: unknown split '{s}'; use train, dev (validation) or test.")
        splits.append(_FLEURS_SPLITS[s])
    items: list[Stimulus] = []
    texts: dict[tuple[str, str], Stimulus] = {}
    for d in lang_dirs:
        for split in splits:
            items.extend(_fleurs_split(d, split, root, texts, which == "raw"))
    if _flag(opts, "text"):
        items.extend(texts.values())
    return _finish(items, opts, "fleurs", root)


def _fleurs_split(lang_dir: Path, split: str, root: Path, texts: dict, raw_text: bool) -> Iterator[Stimulus]:
    tsv = lang_dir / f"{split}.tsv"
    if not tsv.is_file():
        return
    audio_dir = lang_dir / "audio" / split
    if not audio_dir.is_dir():
        raise _layout_error("FLEURS", lang_dir, f"audio/{split}/ with the wav files of {split}.tsv")
    locale, missing = lang_dir.name, 0
    for n, line in enumerate(tsv.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 7 or not cols[0].isdigit():
            raise UserError(f"{tsv}, line {n}: expected 7 tab-separated FLEURS columns (id, file, raw "
                            f"transcription, transcription, characters, num_samples, gender); got {len(cols)}.")
        sid, fname, raw, normalized, _, _, gender = cols
        path = audio_dir / fname
        if not path.is_file():
            missing += 1
            continue
        labels: dict[str, Any] = {"semantic_id": f"fleurs-{sid}", "language": label_code(locale), "locale": locale,
                                  "modality": "speech", "split": split, "transcript": raw,
                                  "transcript_normalized": normalized}
        if _gender(gender):
            labels["gender"] = _gender(gender)
        yield Stimulus(id=f"fleurs-{locale}-{split}-{Path(fname).stem}", audio=path, labels=labels)
        texts.setdefault((locale, sid), Stimulus(id=f"fleurs-{locale}-{sid}-text", text=raw if raw_text else normalized,
                                                 labels={
            "semantic_id": f"fleurs-{sid}", "language": label_code(locale), "locale": locale, "modality": "text"}))
    if missing:
        warnings.warn(f"fleurs: {missing} rows of {tsv} have no audio in {audio_dir}; they were skipped.")


# --- Common Voice and CoVoST 2 ---------------------------------------------------------------------------

def _cv_labels(row: dict[str, str], locale: str) -> dict[str, Any]:
    labels: dict[str, Any] = {"language": label_code(locale), "locale": locale, "modality": "speech"}
    sentence = row.get("sentence") or ""
    if sentence:
        labels["transcript"] = sentence
    labels["semantic_id"] = f"cv-{row['sentence_id']}" if row.get("sentence_id") else _text_id("cv", sentence)
    if row.get("client_id"):
        labels["client_id"] = row["client_id"]
    g = _gender(row.get("gender") or "")
    if g:
        labels["gender"] = g
    for key in ("age", "accent", "accents"):
        if (row.get(key) or "").strip():
            labels["accent" if key == "accents" else key] = row[key].strip()
    return labels


def load_commonvoice(arg: str) -> Dataset:
    """Common Voice: ``<root>/<lang>/{validated,train,dev,test}.tsv`` plus ``<root>/<lang>/clips/``.

    Gender, age and accent are self-reported and often empty; they are labels only where present, and
    ``require=gender`` keeps only the items that have them. Options: split (default test), languages,
    require, limit.
    """
    root, opts = _parse(arg, "commonvoice", ["split", "languages", "require"])
    is_lang = lambda d: (d / "clips").is_dir() and any(d.glob("*.tsv"))  # noqa: E731
    lang_dirs = [root] if is_lang(root) else sorted(d for d in root.iterdir() if d.is_dir() and is_lang(d))
    if not lang_dirs:
        raise _layout_error("Common Voice", root, "<lang>/{validated,train,dev,test}.tsv and <lang>/clips/")
    wanted = _values(opts, "languages")
    if wanted:
        known = {d.name for d in lang_dirs}
        lang_dirs = [d for d in lang_dirs if d.name in wanted or label_code(d.name) in wanted]
        if not lang_dirs:
            raise UserError(f"commonvoice: none of {', '.join(wanted)} in {root}; found: {', '.join(sorted(known))}.")
    require = _values(opts, "require", []) or []
    items: list[Stimulus] = []
    seen: set[str] = set()
    for d in lang_dirs:
        for split in _values(opts, "split", ["test"]) or []:
            tsv = d / f"{split}.tsv"
            if not tsv.is_file():
                raise _layout_error("Common Voice", d, f"{split}.tsv next to clips/")
            for row in _read_tsv(tsv):
                if "path" not in row:
                    raise UserError(f"{tsv}: no 'path' column; Common Voice TSVs start with client_id, path, sentence.")
                item_id = f"cv-{d.name}-{Path(row['path']).stem}"
                labels = _cv_labels(row, row.get("locale") or d.name)
                if item_id in seen or any(k not in labels for k in require):
                    continue
                seen.add(item_id)
                items.append(Stimulus(id=item_id, audio=d / "clips" / row["path"], labels={**labels, "split": split}))
    return _finish(items, opts, "commonvoice", root)


def load_covost2(arg: str) -> Dataset:
    """CoVoST 2: a Common Voice language folder (``clips/``, ``validated.tsv``) plus ``covost_v2.<src>_<tgt>.tsv``.

    Each clip keeps its translation, and ``text=yes`` adds the transcript and the translation as text items
    sharing the clip's semantic_id: speech, its text and its translation line up. Options: pair (fr_en; needed
    when several TSVs are present), split (train/dev/test, default test), text, limit.
    """
    root, opts = _parse(arg, "covost2", ["pair", "split", "text"])
    tsvs = {p.name[len("covost_v2."):-len(".tsv")]: p for p in root.glob("covost_v2.*_*.tsv")}
    if not tsvs or not (root / "clips").is_dir():
        raise _layout_error("CoVoST 2", root, "clips/ (Common Voice audio) and covost_v2.<src>_<tgt>.tsv")
    pair = opts.get("pair") or (next(iter(tsvs)) if len(tsvs) == 1 else None)
    if pair not in tsvs:
        raise UserError(f"covost2: choose a language pair with ?pair=...; available: {', '.join(sorted(tsvs))}.")
    src, tgt = pair.split("_", 1)
    rows = _read_tsv(tsvs[pair])
    if rows and not {"path", "translation", "split"} <= set(rows[0]):
        raise UserError(f"{tsvs[pair]}: expected columns path, translation, split; found {', '.join(rows[0])}.")
    cv = {r["path"]: r for r in _read_tsv(root / "validated.tsv")} if (root / "validated.tsv").is_file() else {}
    splits = set(_values(opts, "split", ["test"]) or [])
    items: list[Stimulus] = []
    texts: list[Stimulus] = []
    for row in rows:
        if row["split"] not in splits and not (row["split"] == "train_covost" and "train" in splits):
            continue
        row = {**cv.get(row["path"], {}), **{k: v for k, v in row.items() if v}}
        stem = Path(row["path"]).stem
        labels = {**_cv_labels(row, src), "semantic_id": f"covost-{stem}", "split": row["split"],
                  "translation": row["translation"], "target_language": label_code(tgt)}
        items.append(Stimulus(id=f"covost-{stem}", audio=root / "clips" / row["path"], labels=labels))
        common = {"semantic_id": f"covost-{stem}", "modality": "text"}
        if row.get("sentence"):
            texts.append(Stimulus(id=f"covost-{stem}-{src}", text=row["sentence"],
                                  labels={**common, "language": label_code(src)}))
        texts.append(Stimulus(id=f"covost-{stem}-{tgt}", text=row["translation"],
                              labels={**common, "language": label_code(tgt)}))
    if _flag(opts, "text"):
        items += texts
    return _finish(items, opts, f"covost2-{pair}", root)


# --- VCTK ------------------------------------------------------------------------------------------------

_VCTK_FILE = re.compile(r"^([ps]\d+)_(\d+)_(mic[12])\.(flac|wav)$")


def _vctk_speakers(path: Path) -> dict[str, dict[str, str]]:
    """speaker-info.txt: ID AGE GENDER ACCENTS REGION... with a free-text tail; unknown fields are skipped."""
    out: dict[str, dict[str, str]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        cols = line.split()
        if len(cols) < 3 or cols[0].upper() == "ID":
            continue
        info = {"age": cols[1], "gender": _gender(cols[2]) or "", "accent": cols[3] if len(cols) > 3 else ""}
        region = re.sub(r"\(.*?\)", "", " ".join(cols[4:])).strip()
        if region:
            info["region"] = region
        out[cols[0]] = {k: v for k, v in info.items() if v}
    return out


def load_vctk(arg: str) -> Dataset:
    """VCTK 0.92: ``wav48_silence_trimmed/pXXX/pXXX_NNN_mic{1,2}.flac``, ``txt/pXXX/pXXX_NNN.txt``, speaker-info.txt.

    Every utterance exists through two microphones (DPA omni vs Sennheiser condenser), a real device contrast
    with speaker and words fixed: label ``mic``. Options: mic (mic1,mic2; default both), speakers, limit.
    """
    root, opts = _parse(arg, "vctk", ["mic", "speakers"])
    audio_root = root / "wav48_silence_trimmed"
    if not audio_root.is_dir():
        hint = " (wav48/ is the 0.80 release, which has one microphone)" if (root / "wav48").is_dir() else ""
        raise _layout_error("VCTK 0.92", root,
                            f"wav48_silence_trimmed/pXXX/pXXX_NNN_mic1.flac, txt/ and speaker-info.txt{hint}")
    speakers = _vctk_speakers(root / "speaker-info.txt")
    mics = set(_values(opts, "mic", ["mic1", "mic2"]) or [])
    wanted = set(_values(opts, "speakers", []) or [])
    items: list[Stimulus] = []
    for spk_dir in sorted(d for d in audio_root.iterdir() if d.is_dir()):
        if wanted and spk_dir.name not in wanted:
            continue
        for f in sorted(spk_dir.iterdir()):
            m = _VCTK_FILE.match(f.name)
            if not m or m.group(3) not in mics:
                continue
            spk, utt, mic = m.group(1), m.group(2), m.group(3)
            labels: dict[str, Any] = {"speaker": spk, "utterance": utt, "mic": mic, "language": "en",
                                      "modality": "speech", **speakers.get(spk, {})}
            txt = root / "txt" / spk / f"{spk}_{utt}.txt"
            if txt.is_file():
                labels["transcript"] = txt.read_text(encoding="utf-8", errors="replace").strip()
                labels["semantic_id"] = _text_id("vctk", labels["transcript"])
            items.append(Stimulus(id=f"vctk-{spk}_{utt}-{mic}", audio=f, labels=labels))
    if not items and not wanted:
        raise _layout_error("VCTK 0.92", audio_root, "pXXX/pXXX_NNN_mic1.flac and ..._mic2.flac files")
    return _finish(items, opts, "vctk", root)


# --- SAKURA ----------------------------------------------------------------------------------------------

SAKURA_TRACKS = ("Gender", "Language", "Emotion", "Animal")
_SAKURA_COLUMNS = {"file", "attribute_label", "single_instruction", "single_answer", "multi_instruction",
                   "multi_answer"}


def _sakura_language(name: str) -> str:
    """SAKURA's language labels are English names (English, Chinese): the ISO code where the table has one."""
    lang = find(name)
    return lang.iso1 if lang else name


def load_sakura(arg: str) -> Dataset:
    """SAKURA (Interspeech 2025): ``<Track>/metadata.csv`` with the track's audio in ``<Track>/audio/``.

    Each item carries the track's attribute under its own key (gender, language, emotion, animal; language
    as an ISO code) and under ``attribute``, the question as ``prompt`` and the expected reply as ``answer``.
    Options: track (Gender,Language,Emotion,Animal; default all present), hop (single or multi), limit.
    """
    root, opts = _parse(arg, "sakura", ["track", "hop"])
    base = root / "data" if (root / "data").is_dir() else root
    present = {d.name.lower(): d for d in base.iterdir() if d.is_dir() and (d / "metadata.csv").is_file()}
    if not present:
        raise _layout_error("SAKURA", root, f"{{{','.join(SAKURA_TRACKS)}}}/metadata.csv with audio/ next to it")
    tracks = [t.lower() for t in _values(opts, "track", [t for t in SAKURA_TRACKS if t.lower() in present]) or []]
    for t in tracks:
        if t not in present:
            raise UserError(f"sakura: track '{t}' not found in {base}; present: {', '.join(sorted(present))}.")
    hop = opts.get("hop", "single")
    if hop not in ("single", "multi"):
        raise UserError(f"sakura: hop must be single or multi, got '{hop}'.")
    items: list[Stimulus] = []
    for track in tracks:
        d = present[track]
        with (d / "metadata.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not _SAKURA_COLUMNS <= set(rows[0]):
            raise UserError(f"{d / 'metadata.csv'}: expected columns {', '.join(sorted(_SAKURA_COLUMNS))}; "
                            f"found {', '.join(rows[0])}.")
        for row in rows:
            audio = d / "audio" / row["file"] if (d / "audio" / row["file"]).is_file() else d / row["file"]
            if not audio.is_file():
                raise UserError(f"sakura: audio '{row['file']}' listed in {d / 'metadata.csv'} is missing "
                                f"(looked in {d / 'audio'} and {d}).")
            value = row["attribute_label"].strip()
            key_value = _sakura_language(value) if track == "language" else value.lower()
            labels = {track: key_value, "attribute": value, "track": track, "modality": "speech",
                      "answer": row[f"{hop}_answer"].strip()}
            items.append(Stimulus(id=f"sakura-{track}-{Path(row['file']).stem}", audio=audio,
                                  prompt=row[f"{hop}_instruction"].strip(), labels=labels))
    return _finish(items, opts, f"sakura-{hop}", root)


SOURCES: dict[str, Callable[[str], Dataset]] = {
    "fleurs": load_fleurs,
    "covost2": load_covost2,
    "commonvoice": load_commonvoice,
    "vctk": load_vctk,
    "sakura": load_sakura,
}
