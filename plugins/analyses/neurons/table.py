"""The expertise table: one row per unit of every site, for one label value (and one modality and step).

Columns are the reference's (Kojima's ``ExpertiseResult.export_as_pandas``, kept by seed 002's released code:
``ap, off_mean, off_p50, on_p50, on_p90, layer, unit``) with this project's site vocabulary instead of module
paths: ``site`` (``stack.layer.component``, e.g. ``text_decoder.3.fc1``, or ``stack.extra``), ``stack``,
``layer`` (an int; -1 for a stack-level extra, which has none), ``component`` and ``unit`` (the index of the
hidden dimension inside the site). The reference's ``layer`` column holds the module path; here that role is
``site``. Rows run over sites in the order given, units ascending within a site (the reference's order).

CSV is written with the stdlib ``csv`` module (no pandas: the project does not depend on it). Floats are written
as Python's shortest round-trip repr, so a table read back is bit-identical to the one written (the reference
casts to float32 on export; this table keeps float64).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from os import PathLike
from typing import Mapping

import numpy as np
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.neurons.expertise import Expertise

KEY_COLUMNS = ("site", "stack", "layer", "component", "unit")
VALUE_COLUMNS = ("ap", "on_p50", "on_p90", "off_mean", "off_p50")
COLUMNS = KEY_COLUMNS + VALUE_COLUMNS


@dataclass(frozen=True)
class ExpertiseTable:
    """Column arrays of equal length: strings for site/stack/component, int64 layer/unit, float64 values."""

    site: np.ndarray
    stack: np.ndarray
    layer: np.ndarray
    component: np.ndarray
    unit: np.ndarray
    ap: np.ndarray
    on_p50: np.ndarray
    on_p90: np.ndarray
    off_mean: np.ndarray
    off_p50: np.ndarray

    def __post_init__(self) -> None:
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"expertise table columns differ in length: {lengths}.")

    def __len__(self) -> int:
        return len(self.ap)

    def rows(self, index: np.ndarray) -> "ExpertiseTable":
        """The table restricted to (and ordered by) ``index``: row positions or a boolean mask."""
        return ExpertiseTable(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def stacks(self) -> list[str]:
        """Stack names in the order they first appear."""
        return list(dict.fromkeys(self.stack.tolist()))

    def keys(self, index: np.ndarray | None = None) -> list[tuple[str, int]]:
        """``(site, unit)`` of every row (or of ``index``): what identifies one unit across tables."""
        site, unit = (self.site, self.unit) if index is None else (self.site[index], self.unit[index])
        return list(zip(site.tolist(), unit.tolist()))


def parse_site(site: str) -> tuple[str, int, str]:
    """``stack.layer.component`` -> (stack, layer, component); ``stack.extra`` -> (stack, -1, extra)."""
    parts = site.split(".", 2)
    if len(parts) == 3 and parts[1].lstrip("-").isdigit():
        return parts[0], int(parts[1]), parts[2]
    if len(parts) == 2 and parts[0] and parts[1]:
        return parts[0], -1, parts[1]
    raise ValueError(f"Site '{site}' must look like 'stack.layer.component' or 'stack.extra'.")


def expertise_table(per_site: Mapping[str, Expertise]) -> ExpertiseTable:
    """One table from the per-site results of one label value: rows site by site, units ascending."""
    if not per_site:
        raise ValueError("no sites: an expertise table needs at least one site's results.")
    cols: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
    for site, result in per_site.items():
        stack, layer, component = parse_site(site)
        width = len(result.ap)
        for name, value in zip(KEY_COLUMNS, (site, stack, layer, component)):
            cols[name].append(np.full(width, value))
        cols["unit"].append(np.arange(width, dtype=np.int64))
        for name in VALUE_COLUMNS:
            cols[name].append(np.asarray(getattr(result, name), dtype=np.float64))
    return from_columns({name: np.concatenate(parts) for name, parts in cols.items()})


def write_csv(table: ExpertiseTable, path: str | PathLike[str]) -> None:
    """Write ``table`` as CSV with a header of ``COLUMNS``; floats round-trip exactly."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(zip(*(getattr(table, name).tolist() for name in COLUMNS)))


def read_csv(path: str | PathLike[str]) -> ExpertiseTable:
    """Read a table written by :func:`write_csv`; a file without the expertise columns is refused."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        missing = [c for c in COLUMNS if c not in (header or [])]
        if missing:
            raise UserError(f"{path} is not an expertise table: it lacks the column(s) {', '.join(missing)}.")
        where = [header.index(c) for c in COLUMNS]
        raw = [row for row in reader if row]
    cols = {name: [row[i] for row in raw] for name, i in zip(COLUMNS, where)}
    try:
        out = {name: np.asarray(cols[name], dtype=str) for name in ("site", "stack", "component")}
        out.update({name: np.asarray(cols[name], dtype=np.int64) for name in ("layer", "unit")})
        out.update({name: np.asarray(cols[name], dtype=np.float64) for name in VALUE_COLUMNS})
    except ValueError as err:
        raise UserError(f"{path}: a value in the expertise table cannot be read ({err}).") from None
    return from_columns(out)


def from_columns(cols: Mapping[str, np.ndarray]) -> ExpertiseTable:
    """A table from column arrays or lists (every name of ``COLUMNS``), with dtypes normalised to str, int64
    and float64."""
    out = {name: np.asarray(cols[name], dtype=str) for name in ("site", "stack", "component")}
    out.update({name: np.asarray(cols[name], dtype=np.int64) for name in ("layer", "unit")})
    out.update({name: np.asarray(cols[name], dtype=np.float64) for name in VALUE_COLUMNS})
    return ExpertiseTable(**out)
