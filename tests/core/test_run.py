"""Run folders: probe analyze reruns an analysis from the store, shards merge, a finished run is never damaged."""

from __future__ import annotations

import json
import threading

import numpy as np
from lalm_probe.core.cli import main

TINY = ["--model", "qwen2audio", "--checkpoint", "tiny"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def segments(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("store/**/segments/*"))


def test_probe_analyze_reproduces_the_runs_results_without_collecting_again(capsys, tmp_path, gender_manifest):
    out = tmp_path / "run"
    spec = "logitlens:attribute=gender,heatmap_items=1"
    assert run(capsys, "run", *TINY, "--analysis", spec, "--data", str(gender_manifest), "--out", str(out))[0] == 0
    before = segments(out)
    code, text = run(capsys, "analyze", str(out), "--analysis", spec)
    assert code == 0, text
    assert json.loads((out / "analyses/logitlens/results.json").read_text()) == json.loads(
        (out / "results.json").read_text())
    assert segments(out) == before  # everything came from the store
    # other options of the same analysis: still nothing to collect
    assert run(capsys, "analyze", str(out), "--analysis", "logitlens:attribute=gender,top_k=10,alpha=0.3")[0] == 0
    assert segments(out) == before and (out / "analyses/logitlens-2/results.json").is_file()
    record = json.loads((out / "run.json").read_text())
    assert [a["dir"] for a in record["analyses"]] == ["analyses/logitlens", "analyses/logitlens-2"]


def test_shards_collect_apart_and_the_plain_run_merges_and_analyses(capsys, tmp_path, gender_manifest):
    args = [*TINY, "--analysis", "logitlens:attribute=gender,positions=[last]", "--data", str(gender_manifest),
            "--batch-size", "3"]
    assert run(capsys, "run", *args, "--out", str(tmp_path / "one"))[0] == 0
    sharded = tmp_path / "sharded"
    for k in (0, 1):
        code, text = run(capsys, "run", *args, "--out", str(sharded), "--shard", f"{k}/2")
        assert code == 0 and f"Shard {k}/2 collected" in text
    assert not (sharded / "run.json").exists()  # a shard only collects
    code, text = run(capsys, "run", *args, "--out", str(sharded))
    assert code == 0, text
    assert not list(sharded.glob("store/*/segments/*"))  # the merged run found every row in the parts
    one, two = (np.load(d / "arrays.npz") for d in (tmp_path / "one", sharded))
    assert np.array_equal(one["baseline/last/label_probs"], two["baseline/last/label_probs"])
    assert json.loads((tmp_path / "one/results.json").read_text()) == json.loads((sharded / "results.json").read_text())


def test_torchrun_ranks_shard_the_run_and_pick_their_own_gpu(capsys, tmp_path, gender_manifest, monkeypatch):
    """Under torchrun / accelerate, RANK and WORLD_SIZE shard the collection as --shard would, and LOCAL_RANK picks
    each process's GPU for --device cuda."""
    from lalm_probe.core.run import process_device, shard_of

    args = [*TINY, "--analysis", "logitlens:attribute=gender,positions=[last]", "--data", str(gender_manifest),
            "--batch-size", "3", "--out", str(tmp_path / "ranks")]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert shard_of(None) == (int(rank), 2)
        code, text = run(capsys, "run", *args)
        assert code == 0 and f"Shard {rank}/2 collected" in text
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (process_device("cuda"), process_device("cuda:0"), process_device("cpu")) == ("cuda:1", "cuda:0", "cpu")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    code, text = run(capsys, "run", *args)  # the merge: the same command outside torchrun
    assert code == 0, text
    assert not list((tmp_path / "ranks").glob("store/*/segments/*"))  # every row came from the two parts


def test_a_rerun_with_other_settings_is_refused_and_leaves_the_run_untouched(capsys, tmp_path, gender_manifest):
    out = tmp_path / "run"
    base = [*TINY, "--data", str(gender_manifest), "--out", str(out)]
    assert run(capsys, "run", *base, "--analysis", "logitlens:attribute=gender")[0] == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    code, text = run(capsys, "run", *base, "--analysis", "logitlens:attribute=gender,norm=false")
    assert code == 2 and "holds another run (analysis was 'logitlens:attribute=gender', now" in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files
    assert run(capsys, "run", *base, "--analysis", "logitlens:attribute=gender")[0] == 0  # the same run: fine


def test_a_run_that_failed_before_collecting_gives_its_folder_to_the_corrected_command(capsys, tmp_path,
                                                                                       gender_manifest):
    out = tmp_path / "run"
    base = [*TINY, "--data", str(gender_manifest), "--out", str(out)]
    code, text = run(capsys, "run", *base, "--analysis", "logitlens:attribute=gender,positions=[token:-9999]")
    assert code == 2 and json.loads((out / "run.json").read_text())["status"] == "failed"
    code, text = run(capsys, "run", *base, "--analysis", "logitlens:attribute=gender")
    assert code == 0, text
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    code, text = run(capsys, "run", *base, "--analysis", "logitlens:attribute=gender,norm=false")
    assert code == 2 and "holds another run" in text  # a finished run keeps its folder


def test_a_second_process_on_the_same_folder_is_refused(capsys, tmp_path):
    from lalm_probe.core.rundir import locked

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locked(tmp_path):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        code, text = run(capsys, "run", *TINY, "--analysis", "logitlens", "--data", "synth:demo", "--out",
                         str(tmp_path))
    finally:
        release.set()
        thread.join()
    assert code == 2 and "Another probe process is using" in text
