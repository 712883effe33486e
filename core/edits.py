"""Edits: the declarative changes interventions ask for, and how each one changes a tensor or a mask.

An intervention returns :class:`Edit` objects; the engine turns each into a plain tensor function here and
``tracing`` runs it inside the trace. Values are never edited in place: each edit returns a new tensor, so no
earlier read is silently changed. What an edit does after the prompt pass is decided in :mod:`.steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    - ``set``: output[positions][..., units] = value (one value per unit, or one for all);
    - ``block_attention``: in the attention module ``site`` (e.g. ``lm.3.attn``), the query at ``positions``
      may not attend to the keys in the span ``keys``.
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


def edit_function(edit: Edit, rows: Sequence[Positions], ids: Sequence[str], source_key: str) -> tuple[str, Callable]:
    """The op kind (``edit`` of a value, or ``edit_call`` of a module's arguments) and the function for ``edit``.

    ``rows``: each row's positions on the stack of the edited site.
    """
    selector = check_position(edit.positions)
    chosen = None if edit.items is None else set(edit.items)
    targets = _targets(selector, rows, ids, chosen)
    repeats = follows_generation(selector)

    def where(out: torch.Tensor, state: dict) -> list[tuple[int, int]]:
        if state.get("step", 1) <= 1:
            return targets
        new = new_position(out.shape[1]) if repeats else (0, 0)
        return [new if chosen is None or rid in chosen else (0, 0) for rid in ids]

    if edit.op == "add":
        vector = None if edit.value is None else torch.as_tensor(edit.value)
        if vector is None and edit.source is None:
            raise UserError(f"Edit at '{edit.site}': 'add' needs a value or a source.")

        def add(out: torch.Tensor, state: dict) -> torch.Tensor:
            delta = state[source_key] if edit.source else vector.to(out.device, out.dtype).expand(out.shape[0], -1)
            if delta.shape[-1] != out.shape[-1]:
                raise UserError(f"Edit at '{edit.site}': a vector of width {delta.shape[-1]} cannot be added to "
                                f"{out.shape[-1]} units.")
            new = out.clone()
            for b, (s, e) in enumerate(where(out, state)):
                new[b, s:e] += edit.scale * delta[b].to(out.dtype)
            return new

        return "edit", add

    if edit.op == "set":
        if not edit.units:
            raise UserError(f"Edit at '{edit.site}': 'set' needs a list of units.")
        units = torch.as_tensor(edit.units, dtype=torch.long)
        values = torch.as_tensor(edit.value, dtype=torch.float32).reshape(-1)
        if values.numel() not in (1, len(units)):
            raise UserError(f"Edit at '{edit.site}': {values.numel()} values for {len(units)} units.")

        def set_units(out: torch.Tensor, state: dict) -> torch.Tensor:
            u = units.to(out.device)
            if int(u.max()) >= out.shape[-1]:
                raise UserError(f"Edit at '{edit.site}': unit {int(u.max())} is out of range ({out.shape[-1]} units).")
            new = out.clone()
            v = values.to(out.device, out.dtype).expand(len(u))
            for b, (s, e) in enumerate(where(out, state)):
                new[b, s:e, u] = v
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
                                                     where(hidden, state), keys)
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
