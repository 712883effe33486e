"""Stacks: where a model keeps its layers, checked against the loaded model with every site's width.

A plugin declares named stacks (``audio_encoder``, ``lm``, ``speech_encoder``, ``text_decoder``...), each with
candidate module paths for its layer list, whether it runs once per input or at every decode step, its per-layer
components in the canonical vocabulary and stack-level extras. :func:`resolve_stacks` validates every path at load,
installs taps for channel-first outputs and works out each site's width, so a mismatch fails before any data is
processed and nothing outside a plugin needs a model's config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .errors import PluginError
from .taps import install_tap, tap_path
from .vocab import Component

ComponentSpec = Component | str | tuple[str, ...]


def as_component(spec: ComponentSpec) -> Component:
    """A component from its declaration: a :class:`Component`, a path, or candidate paths."""
    return spec if isinstance(spec, Component) else Component(spec)


@dataclass(frozen=True)
class Stack:
    """A homogeneous stack of layers, e.g. the LM's decoder layers.

    ``components`` maps a component name to where it lives in one layer (a template such as ``decoder_layer()``,
    or paths); ``extras`` are stack-level modules addressed as ``stack.<name>`` (a projector; the ``final_norm``
    is also ``stack.norm``).
    ``hidden_states``: the field of the model's forward output holding this stack's hidden states, which
    ``probe check`` compares the block outputs with.
    """

    name: str
    layers: tuple[str, ...]
    components: Mapping[str, ComponentSpec] = field(default_factory=lambda: {"out": Component("")})
    runs: str = "once"  # "once" per input, or "per_step" during generation
    final_norm: tuple[str, ...] = ()
    unembed: tuple[str, ...] = ()
    extras: Mapping[str, ComponentSpec] = field(default_factory=dict)
    hidden_states: str | None = None

    def __post_init__(self) -> None:
        if self.runs not in ("once", "per_step"):
            raise PluginError(f"Stack '{self.name}': runs must be 'once' or 'per_step', not '{self.runs}'.")
        object.__setattr__(self, "components", {k: as_component(v) for k, v in self.components.items()})
        extras = {k: as_component(v) for k, v in self.extras.items()}
        if self.final_norm and "norm" not in extras:  # the stack's final norm is also readable as `stack.norm`
            extras["norm"] = Component(self.final_norm)
        object.__setattr__(self, "extras", extras)


@dataclass(frozen=True)
class ResolvedStack:
    """A stack whose paths were found in the loaded model, with the width of every component and extra."""

    spec: Stack
    layers_path: str
    num_layers: int
    final_norm: str | None
    unembed: str | None
    extras: Mapping[str, str] = field(default_factory=dict)  # extra -> path from the model root
    paths: Mapping[str, str] = field(default_factory=dict)  # component -> path in a layer (a tap's, channel-first)
    widths: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # component -> per layer; extra -> (w,)

    def module_path(self, layer: int, component: str) -> str:
        rel = self.paths[component]
        base = f"{self.layers_path}.{layer}"
        return f"{base}.{rel}" if rel else base

    def io(self, component: str) -> str:
        """``output`` or ``input``: which side of the module a component is."""
        spec = self.spec.components.get(component) or self.spec.extras[component]
        return spec.io

    def rows_key(self, component: str) -> str:
        """The name under which a row's positions for ``component`` are reported (usually the stack's)."""
        spec = self.spec.components.get(component) or self.spec.extras[component]
        return spec.positions or self.spec.name

    def width(self, component: str, layer: int | None = None) -> int:
        widths = self.widths[component]
        return widths[0 if layer is None else layer]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Follow a dotted path (``model.language_model.layers``) from ``root``; ``""`` is ``root`` itself."""
    mod: Any = root
    for part in filter(None, path.split(".")):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def find_path(root: torch.nn.Module, candidates: Sequence[str]) -> str | None:
    """The first candidate path that exists under ``root``, or None."""
    for path in candidates:
        try:
            get_module(root, path)
            return path
        except (AttributeError, IndexError, TypeError):
            continue
    return None


def module_width(module: torch.nn.Module, io: str) -> int | None:
    """Units of a Linear, Conv1d, norm or Embedding on its output or input side; None for other modules."""
    side = "in" if io == "input" else "out"
    for attr in (f"{side}_features", f"{side}_channels", "embedding_dim"):
        if isinstance(getattr(module, attr, None), int):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return int(tuple(shape)[-1])
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:  # RMSNorm-style
        return int(weight.shape[0])
    return None


class _Widths:
    """Works out component widths of one layer (or the extras of a stack), following references between them."""

    def __init__(self, base: torch.nn.Module, specs: Mapping[str, Component], paths: Mapping[str, str],
                 where: str) -> None:
        self.base, self.specs, self.paths, self.where = base, specs, paths, where
        self.done: dict[str, int] = {}

    def __call__(self, name: str, seen: tuple[str, ...] = ()) -> int:
        if name in self.done:
            return self.done[name]
        if name in seen or name not in self.specs:
            raise PluginError(f"{self.where}.{name}: its width refers to '{name}', which is "
                              f"{'circular' if name in seen else 'not a component of this stack'}.")
        spec = self.specs[name]
        if isinstance(spec.width, int):
            width = spec.width
        elif isinstance(spec.width, str):
            width = self(spec.width, seen + (name,))
        elif callable(spec.width):
            width = int(spec.width(get_module(self.base, self.paths[name])))
        else:
            inferred = module_width(get_module(self.base, self.paths[name]), spec.io)
            if inferred is None:
                kind = type(get_module(self.base, self.paths[name])).__name__
                raise PluginError(f"{self.where}.{name}: cannot infer the width of a {kind}; declare "
                                  "width= (an int, another component's name, or a function of the module).")
            width = inferred
        self.done[name] = width
        return width


def resolve_stacks(model: torch.nn.Module, stacks: Sequence[Stack], plugin: str) -> dict[str, ResolvedStack]:
    """Validate every declared path, install taps and compute widths; every problem is listed in one error."""
    problems: list[str] = []
    out: dict[str, ResolvedStack] = {}
    for st in stacks:
        where = f"{plugin}: {st.name}"
        layers_path = find_path(model, st.layers)
        if layers_path is None:
            problems.append(f"{where}: none of the layer paths {list(st.layers)} exists in {type(model).__name__}")
            continue
        layers = get_module(model, layers_path)
        paths: dict[str, str] = {}  # what sites read (a tap for channel-first outputs)
        real: dict[str, str] = {}  # the module itself, whose type tells its width
        for comp, spec in st.components.items():
            if spec.io == "input" and spec.layout != "time_major":
                problems.append(f"{where}.{comp}: a tap reads a module's output, so an input-side component cannot "
                                f"have layout '{spec.layout}'; read the output of the module before it instead")
                continue
            found = [find_path(layer, spec.candidates) for layer in layers]
            bad = [i for i, p in enumerate(found) if p is None]
            if bad:
                problems.append(f"{where}.{bad[0]}.{comp}: none of the module paths {list(spec.candidates)} exists "
                                f"in {type(layers[bad[0]]).__name__}")
                continue
            for layer in layers:
                if spec.layout != "time_major":
                    install_tap(get_module(layer, found[0]), spec.layout)
            real[comp] = found[0]
            paths[comp] = tap_path(found[0], spec.layout)
        extras: dict[str, str] = {}
        extra_real: dict[str, str] = {}
        for name, spec in st.extras.items():
            path = find_path(model, spec.candidates)
            if path is None:
                problems.append(f"{where}.{name}: none of the module paths {list(spec.candidates)} exists")
                continue
            if spec.layout != "time_major":
                install_tap(get_module(model, path), spec.layout)
            extra_real[name] = path
            extras[name] = tap_path(path, spec.layout)
        norm = find_path(model, st.final_norm) if st.final_norm else None
        unembed = find_path(model, st.unembed) if st.unembed else None
        for what, cands, found_path in (("final norm", st.final_norm, norm), ("unembedding", st.unembed, unembed)):
            if cands and found_path is None:
                problems.append(f"{where} {what}: none of the module paths {list(cands)} exists")
        if problems:
            continue
        try:
            per_layer = [_Widths(layer, st.components, real, f"{where}.{i}") for i, layer in enumerate(layers)]
            widths = {c: tuple(w(c) for w in per_layer) for c in paths}
            ew = _Widths(model, st.extras, extra_real, where)
            widths.update({n: (ew(n),) for n in extras})
        except PluginError as exc:
            problems.append(str(exc))
            continue
        out[st.name] = ResolvedStack(st, layers_path, len(layers), norm, unembed, extras, paths, widths)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        err = PluginError(f"Model plugin {problems[0]}; the plugin does not match this checkpoint's "
                          f"architecture{more}.")
        err.problems = problems  # type: ignore[attr-defined]
        raise err
    return out
