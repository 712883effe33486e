"""Taps: read and edit a module's output in the layout sites use, ``(batch, time, units)``.

Some modules return another layout (a Conformer's ``nn.Conv1d`` gives ``(batch, channels, time)``). A tap is an
identity child module, ``<module>.probe_tap``, that the module's output passes through in the site layout: a forward
hook converts the output to that view, calls the tap, and converts the tap's result back. The site then addresses
the tap like any module, and reads or edits of it act on the real activation. Parameters and state dicts are
unchanged (an identity has none). This is the extension point for new layouts: add an entry to :data:`LAYOUTS`.

Layouts:

- ``channels_first``: ``(batch, channels, time)`` (a Conformer's ``nn.Conv1d``), read and edited transposed.
- ``packed``: encoders that pack every clip of a batch into one sequence with no batch axis (the Qwen2.5-Omni and
  Qwen3-Omni audio towers give ``(sum of clip lengths, units)``), or that split clips into fixed windows on the
  batch axis (Audio Flamingo 3's 30 s windows, ``(windows, time, units)``), are read as one row
  ``(1, all positions, units)``. A plugin then reports each clip as ``Positions(offset=<its start in that row>,
  length=<its valid positions>, row=0)``, so ``mean``/``last``/spans are per clip whatever the packing (Voxtral's
  projector input and a Q-Former's windows too: their batch axis is not the items'). Tuple outputs (encoder layers
  that return ``(hidden,)``) are viewed through their first element.
- ``altup``: ``(streams, batch, time, units)``, the stacked residual streams of an AltUp layer (Gemma 3n's decoder
  layers, whose ``altup_active_idx`` is 0). Stream 0 is the one the layer computes (attention and MLP run on it)
  and the one the site reads and edits; the other streams pass through unchanged.

Lazy taps: some views cost real work to build (a mixture-of-experts layer's expert i exists only at the tokens
routed to it, so its ``(batch, time, units)`` view is a dense scatter, per expert and per part). A
:class:`LazyTap` is called, and its view built, only while it is *armed*: :func:`arming` arms the taps at the module
paths a pass reads or edits (:mod:`.tracing` does it for every trace, so the engine reads them like any module),
and modules on the way that hold lazy taps (:class:`Armable`) are armed with them, so their owner checks one flag
and does nothing extra in passes that touch none of its taps. Outside the engine (a plain forward, your own hooks)
a lazy tap is not called unless you arm it: ``with arming(model, ["...probe_tap.3.act"]): model(**inputs)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

TAP = "probe_tap"


def _packed_view(out: Any) -> torch.Tensor:
    first = out[0] if isinstance(out, tuple) else out
    return first.reshape(1, -1, first.shape[-1])


def _packed_back(out: Any, view: torch.Tensor) -> Any:
    first = out[0] if isinstance(out, tuple) else out
    new = view.reshape(first.shape)
    return (new, *out[1:]) if isinstance(out, tuple) else new


# layout -> (to the site view, back from it): to_view(output) and from_view(original output, edited view)
LAYOUTS: dict[str, tuple[Callable[[Any], torch.Tensor], Callable[[Any, torch.Tensor], Any]]] = {
    "channels_first": (lambda out: out.transpose(1, 2), lambda _out, view: view.transpose(1, 2)),
    "packed": (_packed_view, _packed_back),
    "altup": (lambda out: out[0], lambda out, view: torch.cat([view.unsqueeze(0), out[1:]])),
    # a pooled ``(batch, units)`` output (a sentence embedding) read and edited as one position
    "vector": (lambda out: out.unsqueeze(1), lambda _out, view: view.squeeze(1)),
}


class Tap(torch.nn.Identity):
    """An identity module that exists to be read and edited; its input is a module's output in site layout."""


class Armable:
    """A module that does extra work only while armed (``armed`` counts the passes that arm it; 0: idle)."""

    armed: int = 0


class LazyTap(Tap, Armable):
    """A tap its owner calls only while it is armed (see the module docstring); ``units`` is its width."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.units = units


@contextmanager
def arming(model: torch.nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """Arm every :class:`Armable` module at or on the way to ``paths`` (dotted, from ``model``) for the block."""
    marked: list[Armable] = []
    for path in dict.fromkeys(paths):
        mod: Any = model
        for part in filter(None, path.split(".")):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
            if isinstance(mod, Armable):
                marked.append(mod)
    for mod in marked:
        mod.armed += 1
    try:
        yield
    finally:
        for mod in marked:
            mod.armed -= 1


def tap_path(path: str, layout: str) -> str:
    """The module path a site reads for a component at ``path`` with ``layout`` (``""`` is the layer itself)."""
    return path if layout == "time_major" else ".".join(filter(None, (path, TAP)))


def to_view(value: Any, layout: str) -> torch.Tensor:
    """A module output (or a model's recorded hidden state in that layout) as sites see it."""
    return value if layout == "time_major" else LAYOUTS[layout][0](value)


def install_tap(module: torch.nn.Module, layout: str) -> None:
    """Give ``module`` a tap for ``layout`` (idempotent: a module is tapped once)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout '{layout}'; known: time_major, {', '.join(LAYOUTS)}.")
    if isinstance(getattr(module, TAP, None), Tap):
        return
    to_view, from_view = LAYOUTS[layout]
    tap = Tap()
    module.add_module(TAP, tap)

    def through_tap(_mod: Any, _args: Any, output: Any) -> Any:
        return from_view(output, tap(to_view(output)))

    module.register_forward_hook(through_tap)
