"""Taps: read and edit a module's output in the layout sites use, ``(batch, time, units)``.

Some modules return another layout (a Conformer's ``nn.Conv1d`` gives ``(batch, channels, time)``). A tap is an
identity child module, ``<module>.probe_tap``, that the module's output passes through in the site layout: a forward
hook converts the output to that view, calls the tap, and converts the tap's result back. The site then addresses
the tap like any module, and reads or edits of it act on the real activation. Parameters and state dicts are
unchanged (an identity has none). This is the extension point for new layouts: add an entry to :data:`LAYOUTS`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

TAP = "probe_tap"

# layout -> (to the site view, back from it): to_view(output) and from_view(original output, edited view)
LAYOUTS: dict[str, tuple[Callable[[Any], torch.Tensor], Callable[[Any, torch.Tensor], Any]]] = {
    "channels_first": (lambda out: out.transpose(1, 2), lambda _out, view: view.transpose(1, 2)),
    # a pooled ``(batch, units)`` output (a sentence embedding) read and edited as one position
    "vector": (lambda out: out.unsqueeze(1), lambda _out, view: view.squeeze(1)),
}


class Tap(torch.nn.Identity):
    """An identity module that exists to be read and edited; its input is a module's output in site layout."""


def tap_path(path: str, layout: str) -> str:
    """The module path a site reads for a component at ``path`` with ``layout``."""
    return path if layout == "time_major" else f"{path}.{TAP}"


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
