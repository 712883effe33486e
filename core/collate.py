"""``probe collate``: one table over several run folders (AudioLens Tables II and III, from one run per model,
attribute and prompt format).

Each run folder contributes its settings (``model``, ``checkpoint``, ``data``, and any parameter of its analysis,
e.g. ``attribute``, ``prompt_format``) and the numbers of its summary. A value is named by a summary entry or
its start: ``accuracy`` is the first entry whose name starts with ``accuracy`` (the logit lens' ``accuracy
(baseline @last)``, the paper's position). Rows are grouped by ``--by`` settings; ``--mean`` averages values
over the runs of a group (Table II: over the three prompt formats); ``--correlate X,Y`` gives Pearson's r and its
p value over the runs of a group (Table III: critical layer vs accuracy across attributes and prompt formats);
``--where`` keeps runs by setting (``attribute!=gender`` for the paper's "excluding gender").
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

from .errors import UserError
from .files import write_json
from .rundir import read_record
from .spec import split_spec


def load_runs(folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Each finished run: its record and its summary (folders without a finished run are refused by name)."""
    runs = []
    paths = []
    for folder in folders:  # a pattern (runs/s003-*) is expanded here too, for shells that do not
        matches = sorted(glob.glob(str(folder))) if any(c in str(folder) for c in "*?[") else []
        paths += [Path(m) for m in matches if Path(m).is_dir()] or [Path(folder)]
    for path in paths:
        record = read_record(path) if path.is_dir() else None
        if record is None or record.get("status") != "complete" or not (path / "results.json").is_file():
            raise UserError(f"{path} is not a finished run folder (run.json complete, results.json).")
        summary = json.loads((path / "results.json").read_text(encoding="utf-8"))["summary"]
        runs.append({"path": str(path), "record": record, "summary": summary})
    if not runs:
        raise UserError("probe collate needs at least one run folder.")
    return runs


def setting(run: dict[str, Any], name: str) -> Any:
    """A run's setting: ``model`` (the plugin name), a run option (``checkpoint``, ``data``), an analysis
    parameter (``attribute``), or a model option (``chat_template``)."""
    record = run["record"]
    cfg, params = record["config"], record["analysis"]["params"]
    model, options = split_spec(cfg["model"])
    if name == "model":
        return model
    for source in (cfg, params, options):
        if name in source:
            return source[name]
    raise UserError(f"Run {run['path']} has no setting '{name}'; settings: model, "
                    f"{', '.join(sorted({*cfg, *params, *options} - {'model'}))}.")


def value(run: dict[str, Any], name: str) -> float:
    """A summary number by its name or the start of its name (the first entry that matches)."""
    summary = run["summary"]
    key = name if name in summary else next((k for k in summary if k.startswith(name)), None)
    if key is None:
        raise UserError(f"Run {run['path']} has no summary entry '{name}'; entries: {', '.join(summary)}.")
    v = summary[key]
    if v is not None and not isinstance(v, (int, float)):
        raise UserError(f"Summary entry '{key}' of {run['path']} is not a number ({v!r}).")
    return float("nan") if v is None else float(v)


def keep(run: dict[str, Any], conditions: Sequence[str]) -> bool:
    """``name=value`` / ``name!=value`` conditions on settings, all of which must hold."""
    for cond in conditions:
        negate = "!=" in cond
        name, _, want = cond.partition("!=" if negate else "=")
        if not name or not _:
            raise UserError(f"--where takes name=value or name!=value, not '{cond}'.")
        if (str(setting(run, name.strip())) == want.strip()) == negate:
            return False
    return True


def collate(runs: list[dict[str, Any]], by: Sequence[str], mean: Sequence[str], correlate: Sequence[str],
            where: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per group of runs with the same ``by`` settings: the run count, the means, the correlation."""
    if correlate and len(correlate) != 2:
        raise UserError("--correlate takes two summary entries, e.g. --correlate critical_layer,accuracy.")
    if not (mean or correlate):
        raise UserError("probe collate needs --mean and/or --correlate.")
    kept = [r for r in runs if keep(r, where)]
    if not kept:
        raise UserError(f"No run matches --where {' '.join(where)}.")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in kept:
        groups.setdefault(tuple(str(setting(run, b)) for b in by), []).append(run)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = {**dict(zip(by, key)), "runs": len(members)}
        for name in mean:
            vals = np.array([value(r, name) for r in members])
            ok = np.isfinite(vals)
            row[name] = float(vals[ok].mean()) if ok.any() else float("nan")
            if not ok.all():
                row[f"{name}: runs without a value"] = int((~ok).sum())
        if correlate:
            x, y = (np.array([value(r, name) for r in members]) for name in correlate)
            ok = np.isfinite(x) & np.isfinite(y)
            r = p = float("nan")
            if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
                r, p = (float(v) for v in stats.pearsonr(x[ok], y[ok]))
            row.update({"pairs": int(ok.sum()), "pearson_r": r, "p_value": p})
        rows.append(row)
    return rows


def write(rows: list[dict[str, Any]], out: str | Path) -> Path:
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    return write_json(Path(out), {"rows": clean})
