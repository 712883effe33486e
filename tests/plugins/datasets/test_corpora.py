"""Corpus loaders on tiny fixtures written in each corpus' real layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lalm_probe.core.audio import load_audio
from lalm_probe.core.data import resolve_dataset
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.datasets.corpora import (
    SOURCES,
    load_commonvoice,
    load_covost2,
    load_fleurs,
    load_sakura,
    load_vctk,
)


def tone(path: Path, rate: int = 16000, hz: float = 220.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(0.2 * rate)) / rate
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate)
    return path


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def _normalized(raw: str) -> str:
    """FLEURS' normalised column: lower case, punctuation removed."""
    return "".join(c for c in raw.lower() if c.isalnum() or c.isspace())


@pytest.fixture
def fleurs(tmp_path: Path) -> Path:
    """google/fleurs: <lang>/{split}.tsv without a header (7 columns) and <lang>/audio/<split>/*.wav."""
    root = tmp_path / "fleurs"
    rows = {"en_us": [("1001", "a1.wav", "The sky is blue.", "MALE"), ("1001", "a2.wav", "The sky is blue.", "FEMALE"),
                      ("1002", "a3.wav", "Rain fell.", "FEMALE")],
            "cmn_hans_cn": [("1001", "b1.wav", "天空是蓝色的。", "FEMALE"), ("1002", "b2.wav", "下雨了。", "MALE")]}
    for lang, lines in rows.items():
        for split in ("test", "dev"):
            text = "".join(f"{i}\t{split}_{f}\t{raw}\t{_normalized(raw)}\t| x |\t3200\t{g}\n"
                           for i, f, raw, g in lines)
            (root / lang).mkdir(parents=True, exist_ok=True)
            (root / lang / f"{split}.tsv").write_text(text, encoding="utf-8")
            for _, f, _, _ in lines:
                tone(root / lang / "audio" / split / f"{split}_{f}")
    return root


def test_fleurs_reads_parallel_ids_across_languages(fleurs: Path) -> None:
    ds = load_fleurs(str(fleurs))
    assert len(ds) == 5
    item = {it.id: it for it in ds}["fleurs-cmn_hans_cn-test-test_b1"]
    assert item.labels == {"semantic_id": "fleurs-1001", "language": "zh", "locale": "cmn_hans_cn", "modality": "speech",
                           "split": "test", "transcript": "天空是蓝色的。", "transcript_normalized": "天空是蓝色的",
                           "gender": "female"}
    langs_of_1001 = {it.labels["language"] for it in ds if it.labels["semantic_id"] == "fleurs-1001"}
    assert langs_of_1001 == {"en", "zh"}
    assert load_audio(item, 16000).shape == (3200,)


def test_fleurs_options(fleurs: Path) -> None:
    ds = load_fleurs(f"{fleurs}?split=validation,test&languages=en&text=yes")
    speech = [it for it in ds if it.has_audio]
    text = [it for it in ds if not it.has_audio]
    assert len(speech) == 6 and {it.labels["split"] for it in speech} == {"dev", "test"}
    # seed 001 App. C: the text side is the normalised transcription, not the raw one
    assert sorted(it.text for it in text) == ["rain fell", "the sky is blue"]
    raw = load_fleurs(f"{fleurs}?languages=en&text=yes&transcription=raw")
    assert sorted(it.text for it in raw if not it.has_audio) == ["Rain fell.", "The sky is blue."]
    with pytest.raises(UserError, match="transcription must be normalized or raw"):
        load_fleurs(f"{fleurs}?text=yes&transcription=clean")
    assert len(load_fleurs(f"{fleurs}?limit=2")) == 2
    assert len(load_fleurs(str(fleurs / "en_us"))) == 3  # a single language folder works too
    with pytest.raises(UserError, match="none of xx"):
        load_fleurs(f"{fleurs}?languages=xx")
    with pytest.raises(UserError, match="unknown split 'eval'"):
        load_fleurs(f"{fleurs}?split=eval")


def test_fleurs_bad_row_names_file_and_line(fleurs: Path) -> None:
    with (fleurs / "en_us" / "test.tsv").open("a", encoding="utf-8") as f:
        f.write("1003\tonly-two-columns\n")
    with pytest.raises(UserError, match=r"test.tsv, line 4: expected 7 tab-separated"):
        load_fleurs(str(fleurs))


@pytest.fixture
def covost(tmp_path: Path) -> Path:
    """A Common Voice language folder plus covost_v2.fr_en.tsv (path, sentence, translation, client_id, split)."""
    root = tmp_path / "cv_fr"
    rows = [["common_voice_fr_1.wav", "Bonjour.", "Hello.", "c1", "test"],
            ["common_voice_fr_2.wav", "Merci beaucoup.", "Thank you very much.", "c2", "test"],
            ["common_voice_fr_3.wav", "Au revoir.", "Goodbye.", "c1", "train_covost"],
            ["common_voice_fr_4.wav", "Oui.", "Yes.", "c3", "dev"]]
    write_tsv(root / "covost_v2.fr_en.tsv", ["path", "sentence", "translation", "client_id", "split"], rows)
    for r in rows:
        tone(root / "clips" / r[0])
    return root


def test_covost2_pairs_speech_with_translation(covost: Path) -> None:
    ds = load_covost2(str(covost))
    assert [it.id for it in ds] == ["covost-common_voice_fr_1", "covost-common_voice_fr_2"]
    labels = ds[0].labels
    assert (labels["language"], labels["target_language"], labels["translation"], labels["client_id"]) == \
        ("fr", "en", "Hello.", "c1")
    assert len(load_covost2(f"{covost}?split=train")) == 1  # train includes train_covost

    with_text = load_covost2(f"{covost}?text=1&pair=fr_en")
    group = [it for it in with_text if it.labels["semantic_id"] == "covost-common_voice_fr_2"]
    assert {(it.labels["modality"], it.labels["language"]) for it in group} == {("speech", "fr"), ("text", "fr"),
                                                                              ("text", "en")}


def test_covost2_takes_sentences_from_validated_tsv(tmp_path: Path) -> None:
    root = tmp_path / "cv_de"
    write_tsv(root / "covost_v2.de_en.tsv", ["path", "translation", "split"], [["x.wav", "Good morning.", "test"]])
    write_tsv(root / "validated.tsv", ["client_id", "path", "sentence", "gender"], [["c9", "x.wav", "Guten Morgen.", "male"]])
    tone(root / "clips" / "x.wav")
    (item,) = load_covost2(str(root))
    assert (item.labels["transcript"], item.labels["client_id"], item.labels["gender"]) == ("Guten Morgen.", "c9", "male")


def test_covost2_needs_a_pair_when_several_exist(covost: Path) -> None:
    write_tsv(covost / "covost_v2.fr_de.tsv", ["path", "translation", "split"], [])
    with pytest.raises(UserError, match="fr_de, fr_en"):
        load_covost2(str(covost))


@pytest.fixture
def commonvoice(tmp_path: Path) -> Path:
    root = tmp_path / "cv"
    header = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", "accents", "locale", "segment"]
    en = [["c1", "common_voice_en_1.mp3", 'He said "hi".', "2", "0", "twenties", "male_masculine", "England English", "en", ""],
          ["c2", "common_voice_en_2.mp3", "Good night.", "2", "0", "", "", "", "en", ""],
          ["c3", "common_voice_en_3.mp3", 'He said "hi".', "3", "0", "forties", "female_feminine", "", "en", ""]]
    write_tsv(root / "en" / "test.tsv", header, en)
    write_tsv(root / "en" / "validated.tsv", header, en)
    write_tsv(root / "zh-CN" / "test.tsv", header, [["c4", "common_voice_zh-CN_1.mp3", "你好。", "2", "0", "", "female", "", "zh-CN", ""]])
    for lang, rows in (("en", en), ("zh-CN", [["", "common_voice_zh-CN_1.mp3"]])):
        for r in rows:
            tone(root / lang / "clips" / r[1].replace(".mp3", ".wav")).rename(root / lang / "clips" / r[1])
    return root


def test_commonvoice_labels_when_present(commonvoice: Path) -> None:
    ds = load_commonvoice(str(commonvoice))
    items = {it.id: it for it in ds}
    assert set(items) == {"cv-en-common_voice_en_1", "cv-en-common_voice_en_2", "cv-en-common_voice_en_3",
                          "cv-zh-CN-common_voice_zh-CN_1"}
    first = items["cv-en-common_voice_en_1"].labels
    assert (first["gender"], first["age"], first["accent"], first["client_id"], first["language"]) == \
        ("male", "twenties", "England English", "c1", "en")
    assert "gender" not in items["cv-en-common_voice_en_2"].labels
    assert items["cv-zh-CN-common_voice_zh-CN_1"].labels["language"] == "zh"
    same_text = {items[k].labels["semantic_id"] for k in ("cv-en-common_voice_en_1", "cv-en-common_voice_en_3")}
    assert len(same_text) == 1  # one sentence read by two speakers shares a semantic id
    assert len(load_commonvoice(f"{commonvoice}?require=gender")) == 3
    assert len(load_commonvoice(f"{commonvoice}?languages=zh")) == 1
    assert str(items["cv-en-common_voice_en_1"].audio).endswith("en/clips/common_voice_en_1.mp3")


@pytest.fixture
def vctk(tmp_path: Path) -> Path:
    root = tmp_path / "VCTK-Corpus-0.92"
    (root).mkdir()
    (root / "speaker-info.txt").write_text(
        "ID  AGE  GENDER  ACCENTS  REGION COMMENTS \n"
        "p225  23  F    English    Southern  England\n"
        "p226  22  M    English    Surrey\n"
        "p280  25  F    French    Paris  (mic2 files unavailable)\n", encoding="utf-8")
    for spk in ("p225", "p226"):
        for utt, text in (("001", "Please call Stella."), ("002", f"Speaker {spk} reads this.")):
            for mic, hz in (("mic1", 200.0), ("mic2", 300.0)):
                tone(root / "wav48_silence_trimmed" / spk / f"{spk}_{utt}_{mic}.flac", rate=48000, hz=hz)
            (root / "txt" / spk).mkdir(parents=True, exist_ok=True)
            (root / "txt" / spk / f"{spk}_{utt}.txt").write_text(text + "\n", encoding="utf-8")
    tone(root / "wav48_silence_trimmed" / "p280" / "p280_001_mic1.flac", rate=48000)
    return root


def test_vctk_reads_both_microphones(vctk: Path) -> None:
    ds = load_vctk(str(vctk))
    assert len(ds) == 9
    items = {it.id: it for it in ds}
    a = items["vctk-p225_001-mic2"].labels
    assert (a["speaker"], a["mic"], a["gender"], a["age"], a["accent"], a["region"], a["transcript"]) == \
        ("p225", "mic2", "female", "23", "English", "Southern England", "Please call Stella.")
    assert items["vctk-p280_001-mic1"].labels["region"] == "Paris"
    stella = {it.labels["semantic_id"] for it in ds if it.labels.get("transcript") == "Please call Stella."}
    assert len(stella) == 1
    assert {it.labels["mic"] for it in load_vctk(f"{vctk}?mic=mic1")} == {"mic1"}
    assert len(load_vctk(f"{vctk}?speakers=p226")) == 4
    assert load_audio(items["vctk-p226_002-mic1"], 16000).shape == (3200,)  # 48 kHz FLAC resampled


@pytest.fixture
def sakura(tmp_path: Path) -> Path:
    root = tmp_path / "SAKURA"
    cols = ["file", "attribute_label", "single_instruction", "single_answer", "multi_instruction", "multi_answer"]
    tracks = {"Gender": [["en_test_0_common_voice_en_1.wav", "Female", "What is the gender? (a) Female (b) Male",
                          "(a) Female", "Which gender, and ...? (a) ... (b) ...", " (b) ..."]],
              "Language": [["de_test_0_common_voice_de_1.wav", "German", "Which language? (a) German (b) French",
                            " (a) German", "multi?", "(a) x"]],
              "Emotion": [["1078_IEO_ANG_HI.wav", "angry", "Emotion? (a) sad (b) angry", " (b) angry", "m?", "(a) y"]]}
    for track, rows in tracks.items():
        d = root / "data" / track
        d.mkdir(parents=True)
        with (d / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([cols, *rows])
        for r in rows:
            tone(d / "audio" / r[0])
    return root


def test_sakura_reads_tracks_questions_and_answers(sakura: Path) -> None:
    ds = load_sakura(str(sakura))
    items = {it.id: it for it in ds}
    assert len(ds) == 3
    g = items["sakura-gender-en_test_0_common_voice_en_1"]
    assert (g.labels["gender"], g.labels["attribute"], g.labels["answer"], g.labels["track"]) == \
        ("female", "Female", "(a) Female", "gender")
    assert g.prompt.startswith("What is the gender?")
    lang = items["sakura-language-de_test_0_common_voice_de_1"]
    assert (lang.labels["language"], lang.labels["attribute"], lang.labels["answer"]) == ("de", "German", "(a) German")
    assert items["sakura-emotion-1078_IEO_ANG_HI"].labels["emotion"] == "angry"
    multi = load_sakura(f"{sakura}?track=Emotion,Gender&hop=multi")
    assert [it.labels["track"] for it in multi] == ["emotion", "gender"]  # in the order asked for
    assert multi[1].prompt == "Which gender, and ...? (a) ... (b) ..." and multi[1].labels["answer"] == "(b) ..."


def test_sakura_missing_audio_and_unknown_track(sakura: Path) -> None:
    with pytest.raises(UserError, match="track 'animal' not found"):
        load_sakura(f"{sakura}?track=Animal")
    (sakura / "data" / "Gender" / "audio" / "en_test_0_common_voice_en_1.wav").unlink()
    with pytest.raises(UserError, match="is missing"):
        load_sakura(f"{sakura}?track=Gender")


@pytest.mark.parametrize("name, expected", [("fleurs", "train,dev,test"), ("covost2", "covost_v2"),
                                            ("commonvoice", "clips/"), ("vctk", "wav48_silence_trimmed"),
                                            ("sakura", "metadata.csv")])
def test_wrong_layout_says_what_was_expected_and_found(tmp_path: Path, name: str, expected: str) -> None:
    tone(tmp_path / "stuff" / "random.wav")
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(UserError) as err:
        SOURCES[name](str(tmp_path / "stuff"))
    msg = str(err.value)
    assert "expected" in msg and expected in msg and "found: notes.txt, random.wav" in msg


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_missing_folder_and_unknown_options(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="folder not found"):
        SOURCES[name](str(tmp_path / "nope"))
    with pytest.raises(UserError, match="Unknown option 'colour'"):
        SOURCES[name](f"{tmp_path}?colour=red")


def test_sources_plug_into_resolve_dataset(fleurs: Path) -> None:
    assert set(SOURCES) == {"fleurs", "covost2", "commonvoice", "vctk", "sakura"}
    ds = resolve_dataset(f"fleurs:{fleurs}?languages=en_us", SOURCES)
    assert len(ds) == 3 and ds.name == "fleurs"
