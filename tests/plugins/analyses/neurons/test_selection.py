"""Expertise tables and top/bottom/both selection: planted units come first, ties break the documented way."""

from __future__ import annotations

import numpy as np
import pytest
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.neurons.expertise import unit_expertise
from lalm_probe.plugins.analyses.neurons.selection import ranking, select, selected_keys
from lalm_probe.plugins.analyses.neurons.table import (
    COLUMNS,
    ExpertiseTable,
    expertise_table,
    from_columns,
    parse_site,
    read_csv,
    write_csv,
)


def table_of(rows: list[tuple[str, int, float]]) -> ExpertiseTable:
    """A table from (site, unit, ap) rows; forcing values are derived so every column is distinct."""
    site = [r[0] for r in rows]
    parsed = [parse_site(s) for s in site]
    ap = np.array([r[2] for r in rows])
    return from_columns({"site": site, "stack": [p[0] for p in parsed], "layer": [p[1] for p in parsed],
                          "component": [p[2] for p in parsed], "unit": [r[1] for r in rows], "ap": ap,
                          "on_p50": ap + 1, "on_p90": ap + 2, "off_mean": ap - 1, "off_p50": ap - 2})


@pytest.fixture
def planted() -> tuple[ExpertiseTable, dict[str, tuple[str, int]]]:
    """Three sites of random units; one unit per stack fires for the label (and one is silenced by it)."""
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.25
    per_site = {}
    for site, width in (("dec.0.fc1", 16), ("dec.1.fc1", 16), ("enc.0.out", 8)):
        x = rng.normal(size=(400, width))
        per_site[site] = x
    per_site["dec.1.fc1"][:, 5] += 3.0 * labels  # fires for the label
    per_site["dec.0.fc1"][:, 9] -= 3.0 * labels  # silenced by the label
    per_site["enc.0.out"][:, 2] += 3.0 * labels
    table = expertise_table({site: unit_expertise(x, labels) for site, x in per_site.items()})
    return table, {"dec_top": ("dec.1.fc1", 5), "dec_bottom": ("dec.0.fc1", 9), "enc_top": ("enc.0.out", 2)}


def test_a_planted_unit_that_fires_for_the_label_is_ranked_first(planted) -> None:
    table, truth = planted
    top = select(table, 1, "top")
    bottom = select(table, 1, "bottom")
    assert table.keys(top["dec"]) == [truth["dec_top"]]
    assert table.keys(top["enc"]) == [truth["enc_top"]]
    assert table.keys(bottom["dec"]) == [truth["dec_bottom"]]
    # far above and below the ~0.25 that a unit blind to the label scores (the positive rate)
    assert table.ap[top["dec"]][0] > 0.85 and table.ap[bottom["dec"]][0] < 0.2


def test_the_table_has_the_reference_columns_and_one_row_per_unit(planted) -> None:
    table, _ = planted
    assert set(("ap", "on_p50", "on_p90", "off_mean", "off_p50", "layer", "unit", "site", "stack")) <= set(COLUMNS)
    assert len(table) == 16 + 16 + 8
    assert table.stacks() == ["dec", "enc"]
    assert table.site[16:18].tolist() == ["dec.1.fc1", "dec.1.fc1"] and table.unit[16:18].tolist() == [0, 1]
    assert table.layer[16] == 1 and table.component[16] == "fc1"


def test_sites_parse_into_stack_layer_and_component() -> None:
    assert parse_site("text_decoder.12.self_attn.q") == ("text_decoder", 12, "self_attn.q")
    assert parse_site("audio_encoder.projector") == ("audio_encoder", -1, "projector")
    with pytest.raises(ValueError, match="stack.layer.component"):
        parse_site("nolayer")


def test_csv_round_trip_is_exact(planted, tmp_path) -> None:
    table, _ = planted
    write_csv(table, tmp_path / "expertise.csv")
    back = read_csv(tmp_path / "expertise.csv")
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(back, name), getattr(table, name))
    assert (tmp_path / "expertise.csv").read_text().splitlines()[0] == ",".join(COLUMNS)


def test_a_csv_without_the_expertise_columns_is_refused(tmp_path) -> None:
    (tmp_path / "other.csv").write_text("ap,layer\n0.5,x\n")
    with pytest.raises(UserError, match="not an expertise table.*on_p50"):
        read_csv(tmp_path / "other.csv")


def test_ties_in_ap_go_to_the_earlier_layer_then_site_then_unit() -> None:
    table = table_of([("m.2.a", 0, 0.9), ("m.1.b", 3, 0.9), ("m.1.a", 7, 0.9), ("m.1.a", 2, 0.9),
                      ("m.0.z", 0, 0.5), ("m.3.a", 1, 0.95), ("m.0.a", 4, 0.5)])
    top = table.keys(ranking(table, "top"))
    assert top == [("m.3.a", 1), ("m.1.a", 2), ("m.1.a", 7), ("m.1.b", 3), ("m.2.a", 0), ("m.0.a", 4), ("m.0.z", 0)]
    bottom = table.keys(ranking(table, "bottom"))
    assert bottom[:2] == [("m.0.a", 4), ("m.0.z", 0)] and bottom[2:5] == top[1:4]
    shuffled = table.rows(np.random.default_rng(1).permutation(len(table)))
    assert shuffled.keys(ranking(shuffled, "top")) == top  # the order depends on the keys, not on row order


def test_both_is_top_k_then_bottom_k_and_needs_2k_units() -> None:
    table = table_of([("s.0.c", u, ap) for u, ap in enumerate([0.1, 0.9, 0.5, 0.3, 0.7])])
    both = select(table, 2, "both")["s"]
    assert table.unit[both].tolist() == [1, 4, 0, 3]
    with pytest.raises(UserError, match="has 5 units.*both needs 2k = 6"):
        select(table, 3, "both")


def test_k_larger_than_a_stack_is_a_user_error_naming_the_stack(planted) -> None:
    table, _ = planted
    assert len(select(table, 8, "top")["enc"]) == 8
    with pytest.raises(UserError, match="Stack 'enc' has 8 units"):
        select(table, 9, "top")
    with pytest.raises(UserError, match="positive whole number"):
        select(table, 0)
    with pytest.raises(UserError, match="Unknown selection kind 'middle'"):
        select(table, 1, "middle")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="not in the expertise table"):
        select(table, 1, stacks=["lm"])


def test_selected_keys_identify_units_across_tables(planted) -> None:
    table, truth = planted
    assert selected_keys(table, select(table, 1, "top", stacks=["dec"])["dec"]) == {truth["dec_top"]}
