"""What an analysis returns and how it is rendered: JSON tables, NPZ arrays, PNG plots, a terminal summary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.markup import escape
from rich.table import Table as RichTable

from .files import write_json


@dataclass
class Table:
    """A titled table of rows (dicts with the same keys); printed with rich and written to results.json."""

    title: str
    rows: list[dict[str, Any]]
    show: bool = True  # print in the terminal summary


@dataclass
class Result:
    """Numbers first: ``summary`` (scalars), ``tables``, ``arrays`` (written to arrays.npz) and ``figures``."""

    summary: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure
    notes: list[str] = field(default_factory=list)
    # Further files, written beside the result: relative path -> a function that writes it there (a table too big
    # for results.json, such as a neuron expertise table). They are written after everything above.
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"summary": _clean(self.summary), "tables": [{"title": t.title, "rows": _clean(t.rows)}
                                                            for t in self.tables], "notes": self.notes}


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_result(result: Result, out: Path) -> list[Path]:
    """Write results.json, arrays.npz and plots/*.png; returns the files written."""
    plt = pyplot()
    written = []
    if result.arrays:
        np.savez_compressed(out / "arrays.npz", **result.arrays)
        written.append(out / "arrays.npz")
    if result.figures:
        (out / "plots").mkdir(exist_ok=True)
        for name, fig in result.figures.items():
            path = out / "plots" / f"{name}.png"
            fig.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    for name, write in result.files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
        written.append(path)
    written.append(write_json(out / "results.json", result.to_json()))
    return written


def report(record: dict[str, Any], result: Result, where: Path) -> str:
    """``report.md``: what was run, the summary, the tables and the plots, readable without the tool."""
    cfg = record["config"]
    lines = [f"# {record['analysis']['name']} on {cfg['model']}", "",
             f"- checkpoint: {cfg.get('checkpoint') or 'default'}",
             f"- data: {cfg.get('data') or 'default'} ({record['dataset'].get('evaluated_items')} items)",
             f"- analysis: `{json.dumps(record['analysis']['params'], default=str)}`",
             f"- interventions: `{json.dumps(record.get('interventions', []), default=str)}`"]
    if "sweep" in record:
        sweep = record["sweep"]
        lines.append(f"- sweep: {len(sweep['variants'])} variants over {', '.join(sweep['params'])} (their resolved "
                     "interventions are in run.json)")
    lines += ["", "## Summary", ""]
    lines += [f"- **{k}**: {_fmt(v) if not isinstance(v, str) else v}" for k, v in result.to_json()["summary"].items()]
    for table in result.tables:
        if not table.show or not table.rows:
            continue
        cols = list(table.rows[0])
        lines += ["", f"## {table.title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in cols) + " |" for r in table.rows[:40]]
        if len(table.rows) > 40:
            lines.append(f"\n_{len(table.rows) - 40} more rows in results.json_")
    plots = sorted((where / "plots").glob("*.png")) if (where / "plots").is_dir() else []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def render(result: Result, console: Any, title: str) -> None:
    """Print the summary and the tables marked ``show`` with rich."""
    if result.summary:
        t = RichTable(title=title, show_header=False)
        for k, v in result.summary.items():
            t.add_row(escape(str(k)), escape(_fmt(v)))
        console.print(t)
    for table in result.tables:
        if not table.show or not table.rows:
            continue
        t = RichTable(title=table.title)
        cols = list(table.rows[0])
        for c in cols:
            t.add_column(escape(str(c)))
        for row in table.rows[:40]:
            t.add_row(*(escape(_fmt(row.get(c))) for c in cols))  # cells may hold tokens such as [/INST]
        if len(table.rows) > 40:
            t.caption = f"{len(table.rows) - 40} more rows in results.json"
        console.print(t)
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/dim]")  # a note may name options such as compare=[language]


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v[:8]) + (" …" if len(v) > 8 else "")
    return str(v)
