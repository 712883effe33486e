"""Site and position addressing.

A site is ``stack.layer.component`` (``lm.12.out``, ``audio_encoder.3.mlp``) or ``stack.extra``
(``audio_encoder.projector``); ``*`` as the layer means every layer. Positions are chosen by meaning and resolved
from each row's metadata, never by counting from the left of a padded batch:

- ``last``: the last valid position; ``mean``: mean over valid positions;
- ``audio`` / ``text`` (or any span the plugin reports): mean over that span;
- ``token:<i>``: the i-th valid position, negative counts from the end (``token:-2`` is the penultimate);
- ``all``: every valid position (variable length; stored as a ragged key); ``all:<span>``: every position of a
  span (``all:text``: each token of the text, the positions seed 004's language distribution averages over);
- ``step:<t>``: during generation, the current position at decode step t (step 1 is the prompt pass, which
  predicts the first new token; seed 002's definition); ``prefix:<t>``: the mean over every decoder position
  up to and including that one (what seed 002's released code pools). Only for stacks that run per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .errors import UserError
from .positions import Positions
from .stacks import ResolvedStack


@dataclass(frozen=True)
class Site:
    stack: str
    layer: int | None  # None for stack-level extras
    component: str

    def __str__(self) -> str:
        return f"{self.stack}.{self.component}" if self.layer is None else f"{self.stack}.{self.layer}.{self.component}"

    def module_path(self, stacks: Mapping[str, ResolvedStack]) -> str:
        st = stacks[self.stack]
        return st.extras[self.component] if self.layer is None else st.module_path(self.layer, self.component)


def parse_sites(patterns: Sequence[str], stacks: Mapping[str, ResolvedStack]) -> list[Site]:
    """Expand site patterns against the loaded model, with a clear error for anything out of range."""
    out: list[Site] = []
    for pat in patterns:
        parts = pat.split(".")
        if parts[0] not in stacks:
            raise UserError(f"Site '{pat}': unknown stack '{parts[0]}'. This model has: {', '.join(stacks)}.")
        st = stacks[parts[0]]
        if len(parts) == 2 and parts[1] in st.extras:
            out.append(Site(st.spec.name, None, parts[1]))
            continue
        if len(parts) != 3:
            raise UserError(f"Site '{pat}' must look like 'stack.layer.component' (e.g. '{st.spec.name}.0.out') "
                            f"or 'stack.extra' (extras: {', '.join(st.extras) or 'none'}).")
        _, layer, comp = parts
        if comp not in st.paths:
            raise UserError(f"Site '{pat}': unknown component '{comp}'. Stack '{st.spec.name}' has: "
                            f"{', '.join(st.paths)}.")
        layers = range(st.num_layers) if layer == "*" else [_layer_index(pat, layer, st.num_layers)]
        out.extend(Site(st.spec.name, i, comp) for i in layers)
    return list(dict.fromkeys(out))


def _layer_index(pat: str, text: str, n: int) -> int:
    try:
        i = int(text)
    except ValueError:
        raise UserError(f"Site '{pat}': layer must be an integer or '*', got '{text}'.") from None
    if not -n <= i < n:
        raise UserError(f"Site '{pat}': layer {i} is out of range; this stack has layers 0..{n - 1}.")
    return i % n


def check_position(selector: str) -> str:
    """Validate a selector's syntax early, before any model runs."""
    if selector in ("last", "mean", "all"):
        return selector
    if selector.startswith("all:"):
        if not selector[4:].replace("_", "").isalnum():
            raise UserError(f"Position '{selector}': expected 'all:<span>' (e.g. all:text, all:audio).")
        return selector
    if selector.startswith(("step:", "prefix:")):
        num = selector.split(":", 1)[1]
        if not num.isdigit() or int(num) < 1:
            raise UserError(f"Position '{selector}': decode steps are numbered from 1 (the prompt pass), "
                            f"e.g. step:1 or prefix:6.")
        return selector
    if selector.startswith("token:"):
        try:
            int(selector.split(":", 1)[1])
        except ValueError:
            raise UserError(f"Position '{selector}': expected 'token:<integer>'.") from None
        return selector
    if selector.replace("_", "").isalnum():
        return selector  # a span name; checked per row
    raise UserError(f"Unknown position '{selector}'. Use last, mean, all, all:<span>, token:<i>, step:<t>, "
                    "prefix:<t> or a span name (audio, text).")


def is_every(selector: str) -> bool:
    """Whether a selector reads every position of its range one by one (``all``, ``all:<span>``)."""
    return selector == "all" or selector.startswith("all:")


def row_range(pos: Positions, selector: str, row_id: str) -> tuple[int, int] | int:
    """An absolute index (single position) or an absolute [start, end) range for one row."""
    if selector == "last":
        return pos.offset + pos.length - 1
    if selector in ("mean", "all"):
        return pos.offset, pos.offset + pos.length
    if selector.startswith("token:"):
        i = int(selector.split(":", 1)[1])
        if not -pos.length <= i < pos.length:
            raise UserError(f"Position '{selector}' is out of range for item '{row_id}' "
                            f"({pos.length} positions).")
        return pos.offset + (i % pos.length)
    if selector.startswith("all:"):
        selector = selector[4:]
    if selector not in pos.spans:
        raise UserError(f"Item '{row_id}' has no '{selector}' span (it has: {', '.join(pos.spans) or 'none'}).")
    s, e = pos.spans[selector]
    if e <= s:
        raise UserError(f"Item '{row_id}': the '{selector}' span is empty.")
    return pos.offset + s, pos.offset + e


class Reducer:
    """Turns a ``(batch, time, ...)`` site output into one vector per row for a selector, on the model's device.

    Single positions become one gather; spans become one weighted sum, so the cost does not grow with the batch.
    """

    def __init__(self, selector: str, rows: Sequence[Positions], row_ids: Sequence[str], time_len: int) -> None:
        self.selector = selector
        ranges = [row_range(p, selector, rid) for p, rid in zip(rows, row_ids)]
        for r, rid in zip(ranges, row_ids):
            hi = r if isinstance(r, int) else r[1] - 1
            if hi >= time_len:
                raise UserError(f"Item '{rid}': position {hi} is past the sequence length {time_len}.")
        self.ranges = ranges
        if is_every(selector):
            self.kind = "all"
        elif all(isinstance(r, int) for r in ranges):
            self.kind = "index"
            self.index = torch.tensor(ranges, dtype=torch.long)
        else:
            self.kind = "weights"
            w = torch.zeros(len(ranges), time_len)
            for b, (s, e) in enumerate(ranges):
                w[b, s:e] = 1.0 / (e - s)
            self.weights = w

    def __call__(self, out: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.kind == "index":
            idx = self.index.to(out.device)
            return out[torch.arange(out.shape[0], device=out.device), idx]
        if self.kind == "weights":
            w = self.weights.to(device=out.device, dtype=out.dtype)
            return torch.einsum("bt,bt...->b...", w, out)
        return [out[b, s:e] for b, (s, e) in enumerate(self.ranges)]
