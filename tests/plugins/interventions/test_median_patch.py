"""median-patch: the chosen units, and only they, are set to their medians at the chosen steps and positions; the
random control draws as many units per site; tables come from a run folder or a probing split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import SR, tone
from lalm_probe.core.data import Dataset, Stimulus
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.neurons.table import from_columns, write_csv
from lalm_probe.plugins.interventions.median_patch import MedianPatch

SITES = {"lm.1.mlp_up": 128, "lm.2.attn_q": 64, "audio_encoder.0.mlp_up": 128}
PLANTED = {("lm.1.mlp_up", 5): 0.99, ("lm.2.attn_q", 7): 0.98, ("lm.1.mlp_up", 9): 0.97,
           ("audio_encoder.0.mlp_up", 3): 0.95}


def planted_table(tmp_path, seed: int = 0):
    """An expertise table over three sites with AP < 0.9 everywhere but four planted units; medians unit-specific."""
    rng = np.random.default_rng(seed)
    cols = {c: [] for c in ("site", "stack", "layer", "component", "unit", "ap", "on_p50", "on_p90", "off_mean",
                            "off_p50")}
    for site, width in SITES.items():
        stack, layer, comp = site.split(".")
        for u in range(width):
            for name, v in (("site", site), ("stack", stack), ("layer", int(layer)), ("component", comp), ("unit", u),
                            ("ap", PLANTED.get((site, u), rng.uniform(0.1, 0.9))), ("on_p50", 3.0 + u / 100),
                            ("on_p90", 4.0), ("off_mean", 0.0), ("off_p50", 0.0)):
                cols[name].append(v)
    path = tmp_path / "table.csv"
    write_csv(from_columns(cols), path)
    return path


def items(n: int = 2) -> list[Stimulus]:
    return [Stimulus(f"i{k}", audio=tone(150 + 40 * k, 0.4 + 0.1 * k), sample_rate=SR) for k in range(n)]


def resolved(session, **kw) -> MedianPatch:
    spec = MedianPatch(value="de", **kw)
    assert spec.calibration(session.view, Dataset(items()), None) is None  # a given table needs no data
    return spec


def test_the_top_k_units_per_stack_are_chosen_with_their_medians(qwen_session, tmp_path):
    spec = resolved(qwen_session, table=str(planted_table(tmp_path)), k=3)
    lm = {s: u for s, u in spec.units.items() if s.startswith("lm.")}
    assert lm == {"lm.1.mlp_up": [[5, 3.05], [9, 3.09]], "lm.2.attn_q": [[7, 3.07]]}
    assert spec.units["audio_encoder.0.mlp_up"][0] == [3, 3.03] and len(spec.units["audio_encoder.0.mlp_up"]) == 3
    only_lm = resolved(qwen_session, table=str(planted_table(tmp_path)), k=3, stacks=["lm"])
    assert only_lm.units == lm
    both = resolved(qwen_session, table=str(planted_table(tmp_path)), k=2, kind="both", stacks=["lm"])
    assert sum(len(u) for u in both.units.values()) == 4


def test_chosen_units_are_set_at_the_chosen_steps_and_nothing_else_changes(qwen_session, tmp_path):
    spec = resolved(qwen_session, table=str(planted_table(tmp_path)), k=3, stacks=["lm"], steps=[2])
    edits = spec.edits(qwen_session.view)
    sites = ["lm.1.mlp_up", "lm.2.attn_q"]
    positions = ["step:1", "step:2", "step:3"]
    clean = qwen_session.generate(items(), 3, sites, positions)
    edited = qwen_session.generate(items(), 3, sites, positions, edits=edits)
    for t in (1,):  # before the edit's step: identical
        for site in sites:
            torch.testing.assert_close(edited.reads[f"{site}@step:{t}"], clean.reads[f"{site}@step:{t}"])
    at = edited.reads["lm.1.mlp_up@step:2"]
    assert torch.all(at[:, 5] == torch.tensor(3.05)) and torch.all(at[:, 9] == torch.tensor(3.09))
    assert torch.all(edited.reads["lm.2.attn_q@step:2"][:, 7] == torch.tensor(3.07))
    keep = torch.ones(128, dtype=torch.bool)
    keep[[5, 9]] = False
    torch.testing.assert_close(at[:, keep], clean.reads["lm.1.mlp_up@step:2"][:, keep])  # layer 1 runs first
    after = edited.reads["lm.1.mlp_up@step:3"]
    assert not torch.any(after[:, 5] == torch.tensor(3.05))  # step 3 is not forced


def test_by_default_every_position_of_every_step_is_forced(qwen_session, tmp_path):
    spec = resolved(qwen_session, table=str(planted_table(tmp_path)), k=3, stacks=["lm"])
    edited = qwen_session.generate(items(), 3, ["lm.1.mlp_up"], ["mean", "step:1", "step:3", "prefix:3"],
                                   edits=spec.edits(qwen_session.view))
    for key in ("mean", "step:1", "step:3", "prefix:3"):  # the prompt's every position, and generated ones
        torch.testing.assert_close(edited.reads[f"lm.1.mlp_up@{key}"][:, [5, 9]],
                                   torch.tensor([[3.05, 3.09]] * 2), rtol=0, atol=1e-5)  # a mean of equal floats


def test_the_random_control_draws_as_many_units_per_site_seeded(qwen_session, tmp_path):
    table = str(planted_table(tmp_path))
    method = resolved(qwen_session, table=table, k=20)
    control = resolved(qwen_session, table=table, k=20, control="random")
    again = resolved(qwen_session, table=table, k=20, control="random")
    other = resolved(qwen_session, table=table, k=20, control="random", seed=1)
    assert {s: len(u) for s, u in control.units.items()} == {s: len(u) for s, u in method.units.items()}
    assert control.units == again.units and control.units != other.units and control.units != method.units
    for site, pairs in control.units.items():  # each drawn unit forced to its own median
        assert all(v == pytest.approx(3.0 + u / 100) for u, v in pairs) and len({u for u, _ in pairs}) == len(pairs)


def test_a_table_is_found_in_a_run_folder_and_refused_from_another_model(qwen_session, tmp_path):
    run = tmp_path / "run"
    found = run / "analyses" / "neurons" / "expertise" / "language=de" / "speech" / "step1.csv"
    found.parent.mkdir(parents=True)
    found.write_bytes(planted_table(tmp_path).read_bytes())
    (run / "run.json").write_text(json.dumps({"config": {"model": "qwen2audio"}}))
    assert resolved(qwen_session, table=str(run), k=3, stacks=["lm"]).units["lm.2.attn_q"] == [[7, 3.07]]
    with pytest.raises(UserError, match="it has positions step1"):
        resolved(qwen_session, table=str(run), position="step:6")
    (run / "run.json").write_text(json.dumps({"config": {"model": "whisper:language=de"}}))
    with pytest.raises(UserError, match="is a run of 'whisper', not of 'qwen2audio'"):
        resolved(qwen_session, table=str(run))


def test_a_table_of_another_site_set_is_refused(qwen_session, tmp_path):
    cols = {"site": ["text_decoder.0.mlp_up"] * 3, "stack": ["text_decoder"] * 3, "layer": [0] * 3,
            "component": ["mlp_up"] * 3, "unit": [0, 1, 2], "ap": [0.9, 0.5, 0.1], "on_p50": [1.0] * 3,
            "on_p90": [1.0] * 3, "off_mean": [0.0] * 3, "off_p50": [0.0] * 3}
    write_csv(from_columns(cols), tmp_path / "other.csv")
    with pytest.raises(UserError, match="do not fit 'qwen2audio'"):
        resolved(qwen_session, table=str(tmp_path / "other.csv"), k=1)
    with pytest.raises(UserError, match="has 192 units in the expertise table; k = 500 is more than that"):
        resolved(qwen_session, table=str(planted_table(tmp_path)), k=500, stacks=["lm"])
    with pytest.raises(UserError, match="needs value="):
        MedianPatch(table=str(tmp_path / "other.csv"))
