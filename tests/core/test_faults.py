"""The bad-input and fault matrix: every case is one line on stderr, the exit status it should have, no traceback,
and nothing passed off as complete. A case is ``(argv, exit status, message, what must not exist afterwards)``;
``DATA`` is a labelled manifest of tones, ``OUT`` the run folder, ``AUDIO`` a manifest whose one item is
``{tmp}/x.wav`` as the case's ``audio`` bytes write it; ``=TABLES``, ``=OTHER`` and ``=CSV`` inside an option are a
folder of expertise tables, a run folder of another model and an expertise table of another site set."""

from __future__ import annotations

import errno
import json
import re
import time

import numpy as np
import pytest
import soundfile as sf
from lalm_probe.core import cli
from lalm_probe.core.cli import main

TINY = ["--model", "qwen2audio", "--checkpoint", "tiny"]
RUN = ["run", *TINY, "--data", "DATA", "--out", "OUT"]


def wav(data: np.ndarray, subtype: str = "PCM_16"):
    def write(path):
        sf.write(path, data, 16000, subtype=subtype)
    return write


CASES = {
    # names and parameters
    "model typo": (["run", "--model", "qwen2audo", "--analysis", "logitlens"], 2, "Did you mean 'qwen2audio'", None),
    "unknown analysis": (["run", *TINY, "--analysis", "logitlense"], 2, "Unknown analysis 'logitlense'", None),
    "unknown intervention": ([*RUN, "--analysis", "logitlens", "--intervention", "audio-mas"], 2,
                             "Did you mean 'audio-mask'", None),
    "parameter type": ([*RUN, "--analysis", "logitlens", "--intervention", "layer-enrich:scale=big"], 2,
                       "expected float, got 'big'", None),
    "unknown parameter": ([*RUN, "--analysis", "logitlens:colour=red"], 2, "unknown parameter", None),
    "unknown attribute": ([*RUN, "--analysis", "logitlens:attribute=accent"], 2,
                          "AudioLens label sets exist for gender, language, emotion, animal", None),
    "layer out of range": ([*RUN, "--analysis", "logitlens", "--intervention", "layer-enrich:layer=99"], 2,
                           "layer 99 is out of range", None),
    "missing label": ([*RUN, "--analysis", "logitlens:label=emotion"], 2, "has no label 'emotion'", "OUT"),
    "one label value": ([*RUN[:-4], "--data", "ONE", "--out", "OUT", "--analysis", "logitlens:label=gender"], 2,
                        "has 1 value(s) in the data (male); scoring needs at least two", "OUT"),
    "options that do nothing": ([*RUN, "--analysis", "logitlens:label=gender", "--force-target", "gender"], 2,
                                "--force-target forces the decoded prefix", "OUT/store"),
    "no baseline and no intervention": ([*RUN, "--analysis", "logitlens", "--no-baseline"], 2,
                                        "there is no --intervention; drop --no-baseline", "OUT"),
    "no new tokens": ([*RUN, "--analysis", "generate:max_new_tokens=0"], 2, "max_new_tokens must be at least 1",
                      "OUT"),
    "probing split too small": ([*RUN, "--analysis", "logitlens:label=gender", "--intervention", "layer-enrich"],
                                2, "needs more than probe_size=100 items", "OUT"),
    "neurons of one label value": ([*RUN[:-4], "--data", "ONE", "--out", "OUT", "--analysis", "neurons:label=gender"],
                                   2, "one value against the rest needs at least two", "OUT"),
    "neurons of a value with no items": ([*RUN, "--analysis", "neurons:label=gender,values=[child]"], 2,
                                         "no item has gender=child; the data has female, male", "OUT"),
    "neurons k too large": ([*RUN, "--analysis", "neurons:label=gender,k=100000"], 2,
                            "fewer than the 200000 the top/bottom/both-100000 sets need", "OUT/store"),
    "median-patch table of another model": ([*RUN, "--analysis", "generate", "--intervention",
                                             "median-patch:label=gender,value=male,table=OTHER"], 2,
                                            "is a run of 'whisper', not of 'qwen2audio'", "OUT/store"),
    "median-patch step not in the table": ([*RUN, "--analysis", "generate", "--intervention",
                                            "median-patch:label=gender,value=male,table=TABLES,position=step:6"], 2,
                                           "no expertise table for gender=male, speech, step:6; it has positions "
                                           "step1", "OUT/store"),
    "median-patch table of another site set": ([*RUN, "--analysis", "generate", "--intervention",
                                                "median-patch:label=gender,value=male,table=CSV"], 2,
                                               "sites do not fit 'qwen2audio'", "OUT/store"),
    "bad shard": ([*RUN, "--analysis", "logitlens", "--shard", "3/2"], 2, "k must be in 0..N-1", None),
    "bad spec file": ([*RUN, "--analysis", "SPEC"], 2, "is not valid JSON", None),
    "unknown data source": (["run", *TINY, "--analysis", "logitlens", "--data", "synthh:demo"], 2,
                            "Did you mean 'synth'", None),
    "missing manifest": (["run", *TINY, "--analysis", "logitlens", "--data", "/no/such/manifest.jsonl"], 2,
                         "manifest not found", None),
    # checkpoints
    "missing checkpoint dir": (["run", "--model", "qwen2audio", "--checkpoint", "/no/such/dir", "--analysis",
                                "logitlens", "--data", "DATA", "--out", "OUT"], 2,
                               "Checkpoint directory '/no/such/dir' does not exist", None),
    "hub id offline": (["run", "--model", "qwen2audio", "--checkpoint", "nobody/no-such-model", "--analysis",
                        "logitlens", "--data", "DATA", "--out", "OUT"], 2,
                       "is not in the local Hugging Face cache and the hub cannot be reached", None),
    "unknown check": (["check", *TINY, "--only", "nonsense"], 2, "Unknown check(s) ['nonsense']", None),
    # audio, found before the model is loaded: no run folder at all
    "audio missing": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                      "audio file not found", "OUT"),
    "audio not audio": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                        "cannot decode", "OUT"),
    "audio zero bytes": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                         "the file ends early", "OUT"),
    "audio no samples": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                         "holds no samples", "OUT"),
    "audio not finite": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                         "NaN or infinite samples", "OUT"),
    "audio truncated": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                        "is truncated: its header promises 60000 bytes of audio and the file holds 2956", "OUT"),
    "audio garbage mp3": ([*RUN[:-4], "--data", "MP3", "--out", "OUT", "--analysis", "logitlens"], 2,
                          "cannot decode", "OUT"),
    "clip too long": ([*RUN[:-4], "--data", "AUDIO", "--out", "OUT", "--analysis", "logitlens"], 2,
                      "longer than the 5 s 'qwen2audio' reads whole", "OUT/store"),
    # file systems
    "out is a file": ([*RUN[:-2], "--out", "FILE", "--analysis", "logitlens"], 2, "is a file, not a folder", None),
    "out not writable": ([*RUN[:-2], "--out", "/sys/lalm-probe-test", "--analysis", "logitlens"], 2,
                         "permission denied", None),
    "analyze an unfinished folder": (["analyze", "EMPTY", "--analysis", "logitlens"], 2, "is not a finished run",
                                     None),
    # steering and patching
    "empty steering prompt": ([*RUN, "--analysis", "logitlens", "--intervention", "actadd:add=,sub=Bad"], 2,
                              "a steering prompt is empty", "OUT"),
    "steering prompt longer than the text": ([*RUN, "--analysis", "logitlens:attribute=gender,prompt_format=qa",
                                              "--intervention", "actadd:layer=2,sub=Bad,add=a steering prompt that "
                                              "goes on and on for much longer than the question it is added to"],
                                             2, "a value of 86 positions is longer than the 48 positions of item "
                                             "'item0' at 'text'", None),
    "steering vector of the wrong width": ([*RUN, "--analysis", "logitlens", "--intervention",
                                            "steer:vector=[1,2,3],site=lm.3.out"], 2,
                                           "the vector has 3 units but site 'lm.3.out' has 64", "OUT/store"),
    "steering label value that does not exist": ([*RUN, "--analysis", "logitlens", "--intervention",
                                                  "steer:label=gender,target=robot"], 2,
                                                 "no item has gender 'robot' (values: female, male)", "OUT"),
    "patch source that does not exist": ([*RUN, "--analysis", "logitlens", "--intervention", "patch:source=nobody"],
                                         2, "source item 'nobody' is not in the data", "OUT"),
}
CSV = ("site,stack,layer,component,unit,ap,on_p50,on_p90,off_mean,off_p50\n"
       "text_decoder.0.fc1,text_decoder,0,fc1,0,1,1,1,0,0\n")
AUDIO = {"audio missing": None, "audio not audio": b"this is not audio", "audio zero bytes": b"",
         "audio no samples": wav(np.zeros(0, np.float32)),
         "audio not finite": wav(np.array([0.1, np.nan, 0.2], np.float32), "FLOAT"),
         "audio truncated": lambda path: (wav(np.zeros(30000, np.float32))(path),
                                          path.write_bytes(path.read_bytes()[:3000])),
         "clip too long": wav((0.1 * np.sin(np.arange(96000) / 9)).astype(np.float32))}  # 6 s; the tiny window is 5 s


def _manifest(path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_the_right_exit_status(case, capsys, tmp_path, gender_manifest):
    argv, status, message, absent = CASES[case]
    if case in AUDIO:
        write = AUDIO[case]
        if isinstance(write, bytes):
            (tmp_path / "x.wav").write_bytes(write)
        elif write is not None:
            write(tmp_path / "x.wav")
    (tmp_path / "y.mp3").write_bytes(b"\xff\xfb" + bytes(range(256)) * 40)  # an MPEG sync word, then garbage
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "spec.json").write_text("{broken")
    (tmp_path / "empty").mkdir()
    swap = {"DATA": str(gender_manifest), "OUT": str(tmp_path / "out"), "FILE": str(tmp_path / "file"),
            "SPEC": str(tmp_path / "spec.json"), "EMPTY": str(tmp_path / "empty"),
            "AUDIO": _manifest(tmp_path / "audio.jsonl", [{"id": "x", "audio": "x.wav", "labels": {"gender": "m"}}]),
            "MP3": _manifest(tmp_path / "mp3.jsonl", [{"id": "y", "audio": "y.mp3", "labels": {"gender": "m"}}]),
            "ONE": _manifest(tmp_path / "one.jsonl", [{"id": f"t{i}", "text": "hi", "labels": {"gender": "male"}}
                                                      for i in range(3)])}
    tables = tmp_path / "tables" / "expertise" / "gender=male" / "speech"
    tables.mkdir(parents=True)
    (tables / "step1.csv").write_text(CSV)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({"config": {"model": "whisper"}}))
    (tmp_path / "sites.csv").write_text(CSV)
    swap.update(TABLES=str(tmp_path / "tables"), OTHER=str(tmp_path / "other"), CSV=str(tmp_path / "sites.csv"))
    start = time.monotonic()
    code = main([re.sub(r"=([A-Z]+)\b", lambda m: "=" + swap.get(m[1], m[1]), swap.get(a, a)) for a in argv])
    out = capsys.readouterr()
    assert code == status, out.err
    assert message in out.err and "Traceback" not in out.err + out.out
    assert out.err.count("error:") == 1 and out.err.strip().count("\n") == 0  # one line
    if absent:
        assert not (tmp_path / absent.replace("OUT", "out")).exists(), f"{absent} was written"
    assert time.monotonic() - start < 60  # a hub id offline fails in seconds, not after minutes of retries


def test_a_full_disk_is_one_line_and_the_run_is_not_complete(capsys, tmp_path, gender_manifest, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "store"))

    monkeypatch.setattr("lalm_probe.core.store.np.save", full)
    code = main(["run", *TINY, "--analysis", "logitlens:label=gender", "--data", str(gender_manifest), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and err.strip().count("\n") == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"


def test_device_map_without_accelerate_names_the_extra(capsys, tmp_path, gender_manifest, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    code = main(["run", "--model", "qwen2audio", "--checkpoint", "tiny", "--device-map", "auto", "--analysis",
                 "logitlens", "--data", str(gender_manifest), "--out", str(tmp_path / "out")])
    assert code == 2 and "pip install 'lalm-probe[gpu]'" in capsys.readouterr().err


def test_ctrl_c_says_which_folder_to_resume(capsys, tmp_path, gender_manifest, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lalm_probe.core.run.collect", interrupt)
    monkeypatch.chdir(tmp_path)
    code = main(["run", *TINY, "--analysis", "logitlens:label=gender", "--data", str(gender_manifest)])
    err = capsys.readouterr().err
    (folder,) = (tmp_path / "runs").iterdir()  # no --out: the folder was named for the user
    assert code == 130 and f"--out runs/{folder.name}" in err
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"


def test_a_plugin_that_fails_to_import_is_shown_by_probe_list(capsys, monkeypatch):
    from lalm_probe.core.registry import discover

    def broken():
        reg = discover()
        reg.skipped.append("Skipping plugin 'broken' (broken_pkg, from broken 1.0): ImportError: no module named x")
        return reg

    monkeypatch.setattr(cli, "_registry", broken)
    assert main(["list"]) == 0
    assert "skipped: Skipping plugin 'broken' (broken_pkg, from broken 1.0): ImportError" in capsys.readouterr().out
