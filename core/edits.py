"""How each declarative :class:`~lalm_probe.core.plugin.Edit` changes a tensor (or an attention mask).

These are plain tensor functions; the engine wraps them in ops and ``tracing`` runs them inside the trace.
Values are never edited in place: each edit returns a new tensor, so no earlier read is silently changed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .errors import UserError
from .model import ModelPlugin, Positions, Prepared
from .plugin import Edit
from .sites import Site, _row_range, check_position


def _targets(edit: Edit, rows: Sequence[Positions], ids: Sequence[str]) -> list[tuple[int, int]]:
    """Absolute ``[start, end)`` per row that the edit touches (a single position is a length-1 range)."""
    sel = check_position(edit.positions)
    out = []
    for p, rid in zip(rows, ids):
        r = _row_range(p, sel, rid)
        out.append((r, r + 1) if isinstance(r, int) else r)
    return out


def edit_function(edit: Edit, site: Site, prepared: Prepared, ids: Sequence[str], plugin: ModelPlugin,
                  source_key: str) -> tuple[str, Callable]:
    """Return the op kind and the function that applies ``edit`` at ``site`` for this batch."""
    rows = [r[site.stack] for r in prepared.rows]
    targets = _targets(edit, rows, ids)

    follows_generation = check_position(edit.positions) in ("last", "all")

    def where(out: torch.Tensor, state: dict) -> list[tuple[int, int]]:
        # During generation with a KV cache, later steps compute only the newest position: it is the 'last'
        # position and part of 'all'; a span or token:i lies in the prompt and is not touched again.
        if state.get("step", 1) <= 1:
            return targets
        new = (out.shape[1] - 1, out.shape[1]) if follows_generation else (0, 0)
        return [new] * out.shape[0]

    if edit.op == "add":
        vector = None if edit.value is None else torch.as_tensor(edit.value)
        if vector is None and edit.source is None:
            raise UserError(f"Edit at '{edit.site}': 'add' needs a value or a source.")

        def add(out: torch.Tensor, state: dict) -> torch.Tensor:
            delta = state[source_key] if edit.source else vector.to(out.device, out.dtype).expand(out.shape[0], -1)
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
        keys = [_row_range(p, edit.keys, rid) for p, rid in zip(rows, ids)]

        def block(args: tuple, kwargs: dict, state: dict) -> tuple[tuple, dict]:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            batch, q_len = hidden.shape[:2]
            k_len = mask.shape[-1] if mask is not None else q_len
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _blocked_mask(mask, batch, q_len, k_len, hidden.device,
                                                     where(hidden, state), keys)
            return args, kwargs

        return "edit_input", block

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
