"""Edits: the declarative changes interventions ask for, and how each one changes a tensor or a mask.

An intervention returns :class:`Edit` objects; the engine turns each into a plain tensor function here and
``tracing`` runs it inside the trace. Values are never edited in place: each edit returns a new tensor, so no
earlier read is silently changed. What an edit does after the prompt pass is decided in :mod:`.steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import UserError
from .positions import Positions
from .sites import check_position, row_range
from .steps import follows_generation, new_position


@dataclass
class Edit:
    """One change made inside the forward pass.

    ``op``:
    - ``add``: output[positions] += scale * (value, or the value read at ``source`` = ``site@position``);
    - ``set``: output[positions][..., units] = value (one value per unit, or one for all); without ``units`` the
      whole state is replaced (state replacement: activation patching);
    - ``block_attention``: in the attention module ``site`` (e.g. ``lm.3.attn``), the query at ``positions``
      may not attend to the keys in the span ``keys``.
    ``value``: one vector for every position, or a ``(positions, units)`` matrix applied position by position from
    the start of the range (front-aligned, as ActAdd adds its steering prompts; a matrix longer than an item's
    range is refused, and after the prompt pass it is not applied again); or a mapping item id -> either, one
    value per item (items it does not name are left alone).
    ``steps``: decode steps it applies at during generation (None: every step); step 1 is the prompt pass.
    ``items``: the item ids it applies to (None: every item), so one intervention can edit items differently.
    """

    site: str
    op: str
    positions: str = "last"
    value: Any = None
    source: str | None = None
    scale: float = 1.0
    units: list[int] | None = None
    keys: str = "audio"
    steps: list[int] | None = None
    items: list[str] | None = None


def _targets(selector: str, rows: Sequence[Positions], ids: Sequence[str],
             items: Sequence[str] | None) -> list[tuple[int, int]]:
    """Absolute ``[start, end)`` per row at the prompt pass (a single position is a length-1 range; an item the
    edit does not apply to gets an empty range)."""
    out = []
    for p, rid in zip(rows, ids):
        if items is not None and rid not in items:
            out.append((0, 0))
            continue
        r = row_range(p, selector, rid)
        out.append((r, r + 1) if isinstance(r, int) else r)
    return out


def _tensor(value: Any) -> torch.Tensor:
    """A float32 tensor of its own (a stored value may be a read-only memory map)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    return torch.from_numpy(np.array(value, dtype=np.float32))


def _row_values(edit: Edit, ids: Sequence[str]) -> list[torch.Tensor | None]:
    """The value each row gets (None: the row is not edited): one for every row, or the row's own."""
    if isinstance(edit.value, Mapping):
        cache: dict[int, torch.Tensor] = {}
        out = []
        for rid in ids:
            v = edit.value.get(rid)
            out.append(None if v is None else cache.setdefault(id(v), _tensor(v)))
        return out
    value = None if edit.value is None else _tensor(edit.value)
    return [value] * len(ids)


def _fit(edit: Edit, selector: str, targets: list[tuple[int, int]], values: Sequence[torch.Tensor | None],
         ids: Sequence[str]) -> list[tuple[int, int]]:
    """Ranges narrowed to what each row's value covers: a ``(positions, units)`` value runs from the start of its
    range (front-aligned) and must fit in it; a row without a value is not edited."""
    out = []
    for (s, e), v, rid in zip(targets, values, ids):
        if v is None:
            out.append((0, 0))
        elif v.ndim == 2:
            if e > s and len(v) > e - s:
                raise UserError(f"Edit at '{edit.site}': a value of {len(v)} positions is longer than the {e - s} "
                                f"positions of item '{rid}' at '{selector}'.")
            out.append((s, min(e, s + len(v))))
        else:
            out.append((s, e))
    return out


def edit_function(edit: Edit, rows: Sequence[Positions], ids: Sequence[str], source_key: str) -> tuple[str, Callable]:
    """The op kind (``edit`` of a value, or ``edit_call`` of a module's arguments) and the function for ``edit``.

    ``rows``: each row's positions on the stack of the edited site.
    """
    selector = check_position(edit.positions)
    values = _row_values(edit, ids) if edit.op in ("add", "set") else []
    if edit.op == "add" and edit.value is None and edit.source is None:
        raise UserError(f"Edit at '{edit.site}': 'add' needs a value or a source.")
    if edit.op == "set" and edit.value is None:
        raise UserError(f"Edit at '{edit.site}': 'set' needs a value.")
    chosen = None if edit.items is None else set(edit.items)
    if isinstance(edit.value, Mapping):  # one value per item: only the items it names
        chosen = set(edit.value) if chosen is None else chosen & set(edit.value)
    targets = _targets(selector, rows, ids, chosen)
    if values and edit.source is None:
        targets = _fit(edit, selector, targets, values, ids)
    # a (positions, units) value covers prompt positions only: after the prompt pass it is not applied again
    stays = [chosen is None or rid in chosen for rid in ids]
    if values and edit.source is None:
        stays = [keep and v is not None and v.ndim == 1 for keep, v in zip(stays, values)]
    repeats = follows_generation(selector)
    # Each item's row on the output's batch axis: its own, unless the stack batches otherwise (audio clips, chunks).
    index = [b if p.row is None else p.row for b, p in enumerate(rows)]

    def where(out: torch.Tensor, state: dict) -> list[tuple[int, int, int]]:
        """Per item: (row on the output's batch axis, start, end)."""
        if state.get("step", 1) <= 1:
            return [(r, s, e) for r, (s, e) in zip(index, targets)]
        s, e = new_position(out.shape[1]) if repeats else (0, 0)
        return [(b, s, e) if keep else (b, 0, 0) for b, keep in enumerate(stays)]

    def width(v: torch.Tensor, out: torch.Tensor) -> None:
        if v.shape[-1] != out.shape[-1]:
            raise UserError(f"Edit at '{edit.site}': a vector of width {v.shape[-1]} cannot be added to "
                            f"{out.shape[-1]} units.")

    if edit.op == "add":

        def add(out: torch.Tensor, state: dict) -> torch.Tensor:
            new = out.clone()
            for b, (r, s, e) in enumerate(where(out, state)):
                if e <= s:
                    continue
                delta = state[source_key][b] if edit.source else values[b].to(out.device, out.dtype)
                width(delta, out)
                new[r, s:e] += edit.scale * delta.to(out.dtype)
            return new

        return "edit", add

    if edit.op == "set":
        units = None if edit.units is None else torch.as_tensor(edit.units, dtype=torch.long)
        if units is not None:
            if not len(units):
                raise UserError(f"Edit at '{edit.site}': 'set' got an empty list of units.")
            for v in values:
                if v is not None and v.numel() not in (1, len(units)):
                    raise UserError(f"Edit at '{edit.site}': {v.numel()} values for {len(units)} units.")

        def set_units(out: torch.Tensor, state: dict) -> torch.Tensor:
            new = out.clone()
            if units is not None:
                u = units.to(out.device)
                if int(u.max()) >= out.shape[-1]:
                    raise UserError(f"Edit at '{edit.site}': unit {int(u.max())} is out of range ({out.shape[-1]} "
                                    "units).")
            for b, (r, s, e) in enumerate(where(out, state)):
                if e <= s:
                    continue
                v = values[b].to(out.device, out.dtype)
                if units is None:
                    width(v, out)
                    new[r, s:e] = v
                else:
                    new[r, s:e, u] = v.reshape(-1).expand(len(u))
            return new

        return "edit", set_units

    if edit.op == "block_attention":
        keys = [row_range(p, edit.keys, rid) for p, rid in zip(rows, ids)]

        def block(args: tuple, kwargs: dict, state: dict) -> tuple[tuple, dict]:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            batch, q_len = hidden.shape[:2]
            k_len = mask.shape[-1] if mask is not None else q_len
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _blocked_mask(mask, batch, q_len, k_len, hidden.device,
                                                     [(s, e) for _, s, e in where(hidden, state)], keys)
            return args, kwargs

        return "edit_call", block

    raise UserError(f"Unknown edit operation '{edit.op}'; expected add, set or block_attention.")


def _blocked_mask(mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device: Any,
                  queries: Sequence[tuple[int, int]], keys: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Copy of the attention mask in which the chosen queries cannot see the chosen keys.

    Handles the three forms transformers passes: boolean (True = attend), additive float, or None (causal).
    """
    if mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        mask = causal.expand(batch, 1, q_len, k_len)
    mask = mask.expand(batch, *mask.shape[1:]).clone()
    blocked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    for b in range(batch):
        qs, qe = queries[b]
        ks, ke = keys[b]
        mask[b, :, qs:qe, ks:ke] = blocked
    return mask
