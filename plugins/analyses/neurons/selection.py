"""Top-k, bottom-k and both-2k language-selective units per module, with a stable tie-break.

Seed 002 §3.3 (after Kojima et al. 2024) keeps the k units of highest AP (excitatory, "top") and of lowest AP
(inhibitory, "bottom"); the released ``make_limited_expert.py`` does it per module (``speech_encoder``,
``text_encoder``, ``text_decoder``, i.e. per *stack* here) with ``sort_values("ap").head(k)`` and writes "both"
as the top k followed by the bottom k (2k rows). pandas' default sort is not stable, so units tied in AP at the
boundary were picked arbitrarily there (METHODS §0.2). Here the order is total and documented:

- top: AP descending, then layer ascending, then site name ascending (components of one layer), then unit
  ascending; bottom: AP ascending, then the same layer, site, unit keys. Ties therefore go to the earlier layer,
  then to the alphabetically earlier site, then to the lower unit index, on every run and platform.
- both: top-k then bottom-k of the same stack; it needs 2k units so that the two halves are disjoint.
- k larger than the units a stack has is a ``UserError`` naming the stack and what it has.
"""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
from lalm_probe.core.errors import UserError
from lalm_probe.plugins.analyses.neurons.table import ExpertiseTable

Kind = Literal["top", "bottom", "both"]
KINDS: tuple[str, ...] = ("top", "bottom", "both")


def ranking(table: ExpertiseTable, direction: Literal["top", "bottom"], rows: np.ndarray | None = None) -> np.ndarray:
    """Row positions of ``table`` (or of ``rows``), best first for ``direction``, ties broken as documented."""
    if direction not in ("top", "bottom"):
        raise UserError(f"Unknown ranking direction '{direction}'. Available: top, bottom.")
    rows = np.arange(len(table)) if rows is None else np.asarray(rows)
    ap = table.ap[rows]
    primary = -ap if direction == "top" else ap
    # np.lexsort sorts by the LAST key first: AP, then layer, then site, then unit
    order = np.lexsort((table.unit[rows], table.site[rows], table.layer[rows], primary))
    return rows[order]


def select(table: ExpertiseTable, k: int, kind: Kind = "top", stacks: Iterable[str] | None = None
           ) -> dict[str, np.ndarray]:
    """Per stack (module), the row positions of its top-k, bottom-k or both (top-k then bottom-k) units."""
    if kind not in KINDS:
        raise UserError(f"Unknown selection kind '{kind}'. Available: {', '.join(KINDS)}.")
    if int(k) != k or k < 1:
        raise UserError(f"k must be a positive whole number of units, got {k}.")
    k = int(k)
    known = table.stacks()
    wanted = known if stacks is None else list(stacks)
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise UserError(f"Stack(s) {', '.join(unknown)} not in the expertise table. It has: {', '.join(known)}.")
    out: dict[str, np.ndarray] = {}
    for stack in wanted:
        rows = np.flatnonzero(table.stack == stack)
        need = 2 * k if kind == "both" else k
        if need > len(rows):
            what = f"both needs 2k = {need}" if kind == "both" else f"k = {k} is more than that"
            raise UserError(f"Stack '{stack}' has {len(rows)} units in the expertise table; {what}.")
        if kind == "both":
            out[stack] = np.concatenate([ranking(table, "top", rows)[:k], ranking(table, "bottom", rows)[:k]])
        else:
            out[stack] = ranking(table, kind, rows)[:k]
    return out


def selected_keys(table: ExpertiseTable, rows: np.ndarray) -> set[tuple[str, int]]:
    """The selected units as a set of ``(site, unit)``: the identity used to intersect selections."""
    return set(table.keys(rows))
