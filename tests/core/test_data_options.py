"""Options every dataset takes: label-value subsets (``where``) and peak normalisation (seed 000)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from helpers import SR, tone
from lalm_probe.core.audio import load_audio
from lalm_probe.core.data import Dataset, Stimulus, resolve_dataset, split_generic
from lalm_probe.core.errors import UserError


@pytest.fixture
def manifest(tmp_path):
    lines = []
    for i, (gender, accent) in enumerate([("female", "us"), ("male", "us"), ("female", "scottish"),
                                          ("male", "indian"), ("female", "us")]):
        sf.write(tmp_path / f"a{i}.wav", 0.2 * tone(150 + 30 * i, 0.3), SR)
        lines.append(json.dumps({"id": f"i{i}", "audio": f"a{i}.wav", "labels": {"gender": gender, "accent": accent}}))
    lines.append(json.dumps({"id": "t", "text": "hello", "labels": {"gender": "female"}}))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_where_selects_by_label_values_within_each_other(manifest):
    """Seed 000's controlled subsets, e.g. one gender within one accent, on any dataset."""
    ds = resolve_dataset(f"{manifest}?where=gender:female,accent:us")
    assert [it.id for it in ds] == ["i0", "i4"]
    assert [it.id for it in resolve_dataset(f"{manifest}?where=accent:us|indian")] == ["i0", "i1", "i3", "i4"]
    assert [it.id for it in resolve_dataset(f"{manifest}?where=gender:female")] == ["i0", "i2", "i4", "t"]
    with pytest.raises(UserError, match=r"matches none of the 6 items \(accent: indian, scottish, us\)"):
        resolve_dataset(f"{manifest}?where=accent:welsh")
    with pytest.raises(UserError, match="expected key:value"):
        resolve_dataset(f"{manifest}?where=female")


def test_where_passes_a_sources_own_options_through(tmp_path):
    seen = []

    def source(arg: str) -> Dataset:
        seen.append(arg)
        return Dataset([Stimulus(f"x{i}", text="x", labels={"voice": v}) for i, v in enumerate(["m1", "f2", "m1"])])

    ds = resolve_dataset("fake:preset?languages=en&where=voice:m1&sentences=s01", {"fake": source})
    assert seen == ["preset?languages=en&sentences=s01"] and [it.id for it in ds] == ["x0", "x2"]
    assert split_generic("synth:demo") == ("synth:demo", {})
    assert split_generic("a.jsonl?normalize=peak") == ("a.jsonl", {"normalize": "peak"})


def test_peak_normalisation_scales_each_clip_into_minus_one_one(manifest):
    """Seed 000 Fig. 7: "we normalized the speech tensor to the range [-1, 1]"."""
    plain = resolve_dataset(str(manifest))
    peak = resolve_dataset(f"{manifest}?normalize=peak")
    for a, b in zip(plain, peak):
        if not a.has_audio:
            assert b.normalize is None
            continue
        x, y = load_audio(a, SR), load_audio(b, SR)
        assert np.abs(x).max() == pytest.approx(0.06, abs=1e-3)  # 0.2 x 0.3
        assert np.abs(y).max() == pytest.approx(1.0) and np.allclose(y, x / np.abs(x).max(), atol=1e-6)
        assert a.fingerprint() != b.fingerprint()  # a store collected from the raw audio is not reused
    with pytest.raises(UserError, match="normalize must be one of peak"):
        resolve_dataset(f"{manifest}?normalize=rms")
