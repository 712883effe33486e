"""Collection into stores: resumable, collecting only what is missing, reusable across analyses, shardable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.collect import collect, write_outputs
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.outputs import OutputStore
from lalm_probe.core.plugin import Edit, Reads
from lalm_probe.core.store import ActivationStore

READS = [Reads(["lm.*.out"], ["last", "mean"])]


def dataset(n: int = 10) -> Dataset:
    return Dataset([Stimulus(f"x{i}", audio=tone(150 + 40 * i, 0.3 + 0.07 * i), sample_rate=SR, prompt="Hi?")
                    for i in range(n)])


def _collect(session, ds, root, reads=READS, **kw):
    return collect(session, ds, reads, ActivationStore(root, {"test": 1}), batch_size=3, shard_rows=3, **kw)


class Counter:
    """Counts forward passes (one per batch) through the tracer."""

    def __init__(self, session, monkeypatch) -> None:
        self.n, real = 0, session.tracer.run

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(session.tracer, "run", counted)


def test_resume_after_interruption_equals_uninterrupted(qwen_session, tmp_path, monkeypatch):
    ds = dataset()
    order = [it.id for it in ds]
    full = _collect(qwen_session, ds, tmp_path / "full").load(order=order)[1]
    calls, real_run = {"n": 0}, qwen_session.tracer.run

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(qwen_session.tracer, "run", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _collect(qwen_session, ds, tmp_path / "resumed")
    partial = ActivationStore.open(tmp_path / "resumed")
    assert not partial.complete and len(partial.stored_ids()) == 6  # two finished segments survive
    monkeypatch.setattr(qwen_session.tracer, "run", real_run)
    resumed = _collect(qwen_session, ds, tmp_path / "resumed")
    ids, arrays = resumed.load(order=order)
    assert resumed.complete and sum(s["rows"] for s in resumed.manifest["segments"]) == len(ds)  # nothing twice
    for key in full:
        np.testing.assert_array_equal(arrays[key], full[key])


def test_a_second_analysis_collects_only_the_keys_the_store_lacks(qwen_session, tmp_path, monkeypatch):
    ds = dataset(6)
    _collect(qwen_session, ds, tmp_path)
    counter = Counter(qwen_session, monkeypatch)
    _collect(qwen_session, ds, tmp_path)  # the same reads again (another analysis, other options): nothing to do
    assert counter.n == 0
    store = _collect(qwen_session, ds, tmp_path, reads=[Reads(["lm.*.out"], ["last", "token:-2"])])
    assert counter.n == 2  # one pass per batch of 3, for token:-2 only
    assert {k.split("@")[1] for k in store.keys()} == {"last", "mean", "token:-2"}


def test_a_changed_item_is_collected_again_and_the_others_are_kept(qwen_session, tmp_path, monkeypatch):
    ds = dataset(6)
    before = _collect(qwen_session, ds, tmp_path).load(order=[it.id for it in ds])[1]["lm.2.out@last"]
    fixed = Dataset([Stimulus(it.id, audio=tone(900, 0.5), sample_rate=SR, prompt="Hi?") if it.id == "x4" else it
                     for it in ds])
    counter = Counter(qwen_session, monkeypatch)
    after = _collect(qwen_session, fixed, tmp_path).load(order=[it.id for it in ds])[1]["lm.2.out@last"]
    assert counter.n == 1  # the one fixed item, one batch
    np.testing.assert_array_equal(np.delete(after, 4, 0), np.delete(before, 4, 0))
    assert not np.allclose(after[4], before[4])


def test_two_shards_give_the_same_store_as_one_process_byte_for_byte(qwen_session, tmp_path):
    ds = dataset(10)
    order = [it.id for it in ds]
    one = _collect(qwen_session, ds, tmp_path / "one").load(order=order)[1]
    root = ActivationStore(tmp_path / "sharded", {"test": 1})
    for k in (1, 0):  # any order; each part is its own store of the same identity
        collect(qwen_session, ds, READS, root.part(k, 2), batch_size=3, shard_rows=3, shard=(k, 2))
    merged = ActivationStore.open(tmp_path / "sharded")  # reads the parts' segments, copying nothing
    assert merged.stored_ids() == set(order) and not list((tmp_path / "sharded" / "segments").glob("*"))
    for key, value in merged.load(order=order)[1].items():
        assert value.tobytes() == one[key].tobytes(), key


def test_every_position_of_a_few_items_is_stored_ragged(qwen_session, tmp_path):
    ds = dataset(4)
    store = _collect(qwen_session, ds, tmp_path, reads=[Reads(["lm.0.out"], ["all"], items=["x1", "x3"])])
    live = qwen_session.run([ds[1], ds[3]], ["lm.0.out"], ["all"])["lm.0.out@all"]
    stored = store.ragged("lm.0.out@all", ["x1", "x3"])
    assert [s.shape for s in stored] == [tuple(v.shape) for v in live] and stored[0].shape[0] != stored[1].shape[0]
    for s, v in zip(stored, live):
        np.testing.assert_allclose(s, v.numpy(), rtol=1e-6)
    assert store.stored_ids() == {"x1", "x3"}


def test_text_items_record_speech_encoder_keys_as_absent_not_missing(qwen_session, tmp_path, monkeypatch):
    ds = Dataset(list(dataset(2)) + [Stimulus("t", text="hello there", prompt="Hi?")])
    reads = [Reads(["audio_encoder.0.out"], ["mean"])]
    store = _collect(qwen_session, ds, tmp_path, reads=reads)
    assert store.ids_with(["audio_encoder.0.out@mean"]) == {"x0", "x1"} and "t" in store.stored_ids()
    counter = Counter(qwen_session, monkeypatch)
    _collect(qwen_session, ds, tmp_path, reads=reads)
    assert counter.n == 0  # the text item is not collected again


def test_outputs_stop_at_end_of_sequence_with_edits_at_every_step(qwen_session, tmp_path):
    data = dataset(3)
    plain = write_outputs(qwen_session, data, OutputStore(tmp_path / "a.jsonl"), 6, batch_size=2).load()
    model = qwen_session.plugin.model
    prepared = qwen_session.prepare(data.items[:2])
    with torch.no_grad():
        ids = model.generate(**prepared.inputs, max_new_tokens=6, do_sample=False)
    assert [r["output"] for r in plain[:2]] == [o["output"] for o in qwen_session.plugin.decode_outputs(ids, prepared)]
    vec = 5 * torch.ones(model.config.text_config.hidden_size)
    edited = write_outputs(qwen_session, data, OutputStore(tmp_path / "b.jsonl"), 6, batch_size=2, edits=[
        Edit(site="lm.4.out", op="add", positions="last", value=vec)]).load()
    assert [r["id"] for r in edited] == [it.id for it in data]
    assert not (tmp_path / "b.jsonl.partial").exists()
