"""The activation store on its own: memory-mapped keys, streaming, storage dtypes, identity, atomic segments."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lalm_probe.core.errors import UserError
from lalm_probe.core.store import ActivationStore


def filled(root, rows: int = 10, dtype: str = "float32", segment: int = 4) -> tuple[ActivationStore, np.ndarray]:
    values = np.random.default_rng(0).normal(size=(rows, 6)).astype(np.float32)
    store = ActivationStore(root, {"model": "m"}, dtype)
    for start in range(0, rows, segment):
        ids = [f"i{k}" for k in range(start, min(rows, start + segment))]
        store.add(ids, {"a@last": values[start:start + segment]}, ["fp"] * len(ids))
        store.flush()
    store.mark_complete()
    return store, values


def test_keys_are_numpy_files_that_memory_map(tmp_path):
    store, values = filled(tmp_path)
    seg = store.manifest["segments"][0]
    mapped = np.load(tmp_path / seg["dir"] / f"{seg['files']['a@last']}.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, values[:4])
    rows = json.loads((tmp_path / seg["dir"] / "rows.json").read_text())
    assert rows["ids"] == ["i0", "i1", "i2", "i3"]


def test_lazy_reads_of_rows_units_and_chunks_equal_the_whole(tmp_path):
    store, values = filled(tmp_path)
    order = [f"i{k}" for k in (7, 2, 9, 0)]
    array = store.array("a@last", order)
    assert array.shape == (4, 6)
    np.testing.assert_array_equal(array[:], values[[7, 2, 9, 0]])
    np.testing.assert_array_equal(array[:, 2:4], values[[7, 2, 9, 0], 2:4])
    np.testing.assert_array_equal(array[1], values[2])
    chunks = list(store.array("a@last").chunks(rows=3))
    assert [len(ids) for ids, _ in chunks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), values)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_precision_storage_reads_back_as_float32(tmp_path, dtype, tolerance):
    store, values = filled(tmp_path, dtype=dtype)
    back = store.array("a@last")[:]
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, values, rtol=tolerance, atol=tolerance)
    seg = store.manifest["segments"][0]
    on_disk = np.load(tmp_path / seg["dir"] / f"{seg['files']['a@last']}.npy")
    assert on_disk.itemsize == 2


def test_bfloat16_rounds_to_nearest_even():
    from lalm_probe.core.store import _from_disk, _to_disk

    x = np.array([1.0, 1.00390625, 1.01171875, -3.5e-3, 65504.0], dtype=np.float32)
    back = _from_disk(_to_disk(x, "bfloat16"), "bfloat16")
    step = 2.0 ** (np.floor(np.log2(np.abs(x))) - 7)  # bfloat16 keeps 8 significant bits
    assert np.all(np.abs(back - x) <= step / 2)
    assert back[1] == 1.0  # a tie goes to the even neighbour


def test_identity_mismatch_corruption_and_old_formats_are_one_sentence(tmp_path):
    ActivationStore(tmp_path / "a", {"model": "a"})
    with pytest.raises(UserError, match="different configuration"):
        ActivationStore(tmp_path / "a", {"model": "b"})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        ActivationStore.open(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"config": {}, "shards": []}))
    with pytest.raises(UserError, match="older lalm-probe"):
        ActivationStore.open(tmp_path / "c")


def test_an_unfinished_segment_is_never_read(tmp_path):
    store, values = filled(tmp_path, rows=4)
    (tmp_path / "segments" / ".00001.tmp-1-abc").mkdir()  # what an interruption mid-write leaves behind
    again = ActivationStore.open(tmp_path)
    assert again.stored_ids() == {f"i{k}" for k in range(4)}
    np.testing.assert_array_equal(again.array("a@last")[:], values)


def test_missing_and_wrong_keys_say_what_exists(tmp_path):
    store, _ = filled(tmp_path, rows=4)
    with pytest.raises(UserError, match="no 'b@last'; it holds: a@last"):
        store.array("b@last")
    with pytest.raises(UserError, match="lacks 1 of the requested items"):
        store.array("a@last", ["i0", "zz"])
    assert store.missing(["a@last"], {"i0": "fp", "i1": "other", "new": "fp"}) == ["i1", "new"]
