"""Sweeps: one run over several settings of its interventions (AudioLens' accuracy over λ, seed 003 Fig. 5).

A scalar parameter of an intervention given as a list, ``--intervention layer-enrich:scale=[0,0.5,1],
select=[score,random],seed=[0,1,2,3,4]``, expands into one *variant* per combination (the cartesian product over
every swept parameter of every intervention). Each variant is calibrated (calibrations collect without edits, so
they share one store), collected into its own store (variants whose edits come out identical share one: the
method's layer does not depend on ``seed``), and handed to the analysis in ``Stores.variants``. A list-typed
parameter (``audio-mask:layers=[2,3]``) is a value, not a sweep. An intervention class may name parameters it
sweeps unless told otherwise: ``sweep_defaults(params) -> {name: values}`` (layer enrichment repeats its random
baseline over seeds 0-4).

:func:`sweep_table` turns one number per variant into the sweep's table and plot: the swept number with the most
values on the x axis, one line per setting of the other swept parameters, and any swept ``seed`` averaged as
repeats (mean ± std).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .results import Table, pyplot
from .spec import build_params, split_spec

REPEAT = "seed"  # a swept parameter of this name is a repeat: averaged, not a line of its own


@dataclass
class Variant:
    """One setting of a run's interventions: its name (empty for an unswept run), the swept values, the objects."""

    name: str
    params: dict[str, Any]
    interventions: list[Any]


def _raw(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return (spec["name"], dict(spec["params"])) if isinstance(spec, dict) else split_spec(spec)


def _is_list_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return True
    return any(_is_list_type(a) for a in typing.get_args(tp)) if origin is not None else False


def _values(value: Any) -> list[Any] | None:
    """The values of a swept parameter (``[0,0.5]`` on the command line, or a JSON list), else None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        return [v.strip() for v in value.strip()[1:-1].replace(";", ",").split(",") if v.strip()]
    return None


def expand(registry: Any, specs: list[str | dict[str, Any]]) -> list[Variant]:
    """Every variant the intervention specs describe: one when nothing is swept."""
    parsed = []
    for spec in specs:
        name, params = _raw(spec)
        cls = registry.get("intervention", name)
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        swept = {k: vals for k, v in params.items() if k in fields and not _is_list_type(hints[k])
                 and (vals := _values(v)) is not None}
        defaults = getattr(cls, "sweep_defaults", None)
        for k, vals in (defaults(params) if defaults else {}).items():
            swept.setdefault(k, list(vals))  # what the intervention repeats unless told otherwise
        for k, vals in swept.items():
            if not vals:
                raise UserError(f"intervention '{name}': {k}=[] sweeps over no values.")
        parsed.append((name, cls, params, swept))
    axes = [(n, name, k, vals) for n, (name, _, _, swept) in enumerate(parsed) for k, vals in swept.items()]
    counts: dict[str, int] = {}
    for _, _, k, _ in axes:
        counts[k] = counts.get(k, 0) + 1
    label = {(n, k): (k if counts[k] == 1 else f"{name}.{k}") for n, name, k, _ in axes}
    variants = []
    for combo in itertools.product(*(vals for *_, vals in axes)) if axes else [()]:
        chosen = {(n, k): v for (n, _, k, _), v in zip(axes, combo)}
        objects = []
        for n, (name, cls, params, _) in enumerate(parsed):
            mine = {**params, **{k: v for (m, k), v in chosen.items() if m == n}}
            objects.append(build_params(cls, mine, f"intervention '{name}'"))
        values = {label[key]: _scalar(getattr(objects[key[0]], key[1])) for key in chosen}
        variants.append(Variant(", ".join(f"{k}={v}" for k, v in values.items()), values, objects))
    return variants


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def edits_key(edits: list[Any]) -> str:
    """A key equal for identical edit lists, so variants that edit the same way share one collection."""
    return json.dumps([dataclasses.asdict(e) for e in edits], sort_keys=True,
                      default=lambda o: np.asarray(o).tolist())


def sweep_table(values: dict[str, float], variants: list[Variant], what: str, reference: float | None = None
                ) -> tuple[list[Table], Any | None]:
    """The per-variant table, and the sweep over its numeric axis (mean ± std over swept seeds) with a plot.

    ``values``: variant name -> the number to report (e.g. accuracy); ``reference``: the run without
    interventions, drawn as a line. Returns the tables and the figure (None without a numeric axis).
    """
    per = Table(f"{what} per variant", [{**v.params, what: values.get(v.name)} for v in variants])
    swept = {k: sorted({v.params[k] for v in variants}, key=_order) for k in variants[0].params}
    numeric = [k for k, vals in swept.items() if k != REPEAT and len(vals) > 1
               and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)]
    if not numeric:
        return [per], None
    x = max(numeric, key=lambda k: len(swept[k]))
    series = [k for k in swept if k not in (x, REPEAT)]
    groups: dict[tuple, dict[Any, list[float]]] = {}
    for v in variants:
        value = values.get(v.name)
        if value is None or not np.isfinite(value):
            continue
        key = tuple(v.params[k] for k in series)
        groups.setdefault(key, {}).setdefault(v.params[x], []).append(float(value))
    rows = []
    for key, by_x in groups.items():
        for xv in swept[x]:
            vals = by_x.get(xv, [])
            rows.append({**dict(zip(series, key)), x: xv, f"{what} mean": float(np.mean(vals)) if vals else None,
                         f"{what} std": float(np.std(vals)) if vals else None, "repeats": len(vals)})
    over = f" (mean ± std over {REPEAT})" if REPEAT in swept and len(swept[REPEAT]) > 1 else ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (key, by_x) in enumerate(groups.items()):
        xs = [xv for xv in swept[x] if by_x.get(xv)]
        ax.errorbar(xs, [np.mean(by_x[xv]) for xv in xs], yerr=[np.std(by_x[xv]) for xv in xs], marker="o", ms=4,
                    capsize=3, color=plt.cm.tab10(n % 10),
                    label=", ".join(f"{k}={v}" for k, v in zip(series, key)) or what)
    if reference is not None and np.isfinite(reference):
        ax.axhline(reference, ls=":", color="grey", label="without interventions")
    ax.set(xlabel=x, ylabel=what, title=f"{what} over {x}{over}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [per, Table(f"{what} over {x}{over}", rows)], fig


def _order(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
