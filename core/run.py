"""One ``probe run``: load, collect, analyse, and write one run directory.

The directory holds ``run.json`` (config, versions, seed, status), the activation stores, ``results.json``,
``arrays.npz``, ``plots/*.png`` and ``report.md``. ``run.json`` says ``running`` until everything is written and
``complete`` after, so a crashed run is never mistaken for a finished one; rerunning with the same ``--out``
resumes the collection where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Dataset, resolve_dataset
from .engine import Session
from .errors import UserError
from .registry import Registry
from .results import Result, render, write_result
from .spec import build_params, spec_to_json, split_spec
from .store import ActivationStore, OutputStore
from .threads import analysis_threads

DEFAULT_DATA = "synth:demo"  # 4 sentences x 7 languages, one voice: a first run in about a minute
# `probe run` with no arguments: real Whisper base (offline weights) over built-in multilingual speech, with the
# logit lens on the decoder where Whisper identifies the language.
DEFAULT_MODEL = "whisper"
DEFAULT_ANALYSIS = "logitlens:label=language,positions=last"


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL  # NAME or NAME:option=value,... (e.g. whisper:language=de)
    analysis: str = DEFAULT_ANALYSIS
    checkpoint: str | None = None
    data: str | None = None
    interventions: list[str] = field(default_factory=list)
    out: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None
    batch_size: int = 8
    seed: int = 0
    baseline: bool = True  # with interventions, also collect without them for comparison
    force_target: str | None = None  # label whose text is forced as the decoded prefix (step:/prefix: reads)


def build_spec(registry: Registry, kind: str, text: str) -> Any:
    """Turn ``NAME[:k=v,...]`` or a JSON file into a typed analysis or intervention object."""
    name, params = split_spec(text)
    cls = registry.get(kind, name)
    return build_params(cls, params, f"{kind} '{name}'")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lalm-probe", "torch", "transformers", "nnsight", "numpy", "scikit-learn", "librosa"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def execute(cfg: RunConfig, registry: Registry, console: Any) -> tuple[Path, Result]:
    """Run one analysis end to end and return the run directory and the result."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model_name, model_options = split_spec(cfg.model)
    model_cls = registry.get("model", model_name)
    analysis = build_spec(registry, "analysis", cfg.analysis)
    interventions = [build_spec(registry, "intervention", s) for s in cfg.interventions]
    dataset = resolve_dataset(cfg.data or DEFAULT_DATA, registry.dataset_sources())
    out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{model_name}-{analysis.name}")
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"status": "running", "config": asdict(cfg), "analysis": spec_to_json(analysis),
                              "versions": versions(), "seed": cfg.seed, "dataset": {"name": dataset.name,
                                                                                   "items": len(dataset)}}
    _write_json(out / "run.json", record)
    try:
        checkpoint = cfg.checkpoint or model_cls.default_checkpoint
        console.print(f"Loading [bold]{model_name}[/bold] ({checkpoint}) …")
        plugin = model_cls.load(checkpoint, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map,
                                options=model_options)
        session = Session(plugin)
        dataset = _usable(dataset, plugin, record, console)
        for iv in interventions:
            dataset = iv.prepare(session, dataset, analysis)
        record["interventions"] = [spec_to_json(iv) for iv in interventions]  # after prepare: resolved values
        record["dataset"].update({"evaluated_items": len(dataset), "fingerprint": dataset.fingerprint()})
        _write_json(out / "run.json", record)
        req = analysis.requirements(session, dataset)
        for key in req.labels:
            dataset.label_values(key)  # every item must carry the labels before any model time is spent
        edits = [e for iv in interventions for e in iv.edits(session)]
        stores: dict[str, Any] = {}
        plans = [("baseline", [])] if cfg.baseline or not edits else []
        plans += [("intervened", edits)] if edits else []
        force_target = cfg.force_target or req.force_target
        prompt_fn = lambda it: analysis.prompt(session, it)  # noqa: E731
        for name, plan_edits in plans:
            if req.sites:
                config = {"model": cfg.model, "checkpoint": checkpoint, "dtype": cfg.dtype,
                          "dataset": dataset.fingerprint(), "sites": req.sites, "positions": req.positions,
                          "force_target": force_target, "analysis": spec_to_json(analysis),
                          "interventions": record["interventions"] if plan_edits else []}
                store = ActivationStore(out / "store" / name, config)
                session.collect(dataset, req.sites, req.positions, store, batch_size=cfg.batch_size,
                                edits=plan_edits, prompt_fn=prompt_fn, description=f"Collecting ({name})",
                                force_target=force_target)
                stores[name] = store
            if req.generate:
                # outputs.jsonl holds what this run's model said (with its interventions); the baseline beside it
                main = name == "intervened" or not edits
                path = out / ("outputs.jsonl" if main else "baseline_outputs.jsonl")
                stores[f"{name}:outputs"] = session.write_outputs(
                    dataset, OutputStore(path), req.generate, batch_size=cfg.batch_size, edits=plan_edits,
                    prompt_fn=prompt_fn, description=f"Generating ({name})")
        for kind in ("", ":outputs"):
            if f"baseline{kind}" not in stores and f"intervened{kind}" in stores:
                stores[f"baseline{kind}"] = stores.pop(f"intervened{kind}")
        with analysis_threads():  # t-SNE and SVD crawl when BLAS threads fight over a small machine
            result = analysis.analyze(session, dataset, stores)
        written = write_result(result, out)
        (out / "report.md").write_text(_report(cfg, record, result), encoding="utf-8")
        outputs = sorted(p.name for p in out.glob("*outputs.jsonl"))
        record.update(status="complete", files=[str(p.relative_to(out)) for p in written] + outputs)
        _write_json(out / "run.json", record)
    except BaseException as exc:
        record.update(status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                      error=f"{type(exc).__name__}: {exc}")
        _write_json(out / "run.json", record)
        raise
    render(result, console, f"{analysis.name} on {cfg.model}")
    console.print(f"Run written to [bold]{out}[/bold]", soft_wrap=True)
    return out, result


def _usable(dataset: Dataset, plugin: Any, record: dict[str, Any], console: Any) -> Dataset:
    """Keep the items the model can take (Whisper takes speech only), saying how many were left out."""
    kept = [it for it in dataset if plugin.accepts(it)]
    if not kept:
        raise UserError(f"None of the {len(dataset)} items can be fed to '{plugin.name}', which takes "
                        f"{' and '.join(plugin.modalities)} input.")
    if len(kept) < len(dataset):
        skipped = len(dataset) - len(kept)
        console.print(f"[yellow]Leaving out {skipped} of {len(dataset)} items[/yellow]: '{plugin.name}' takes "
                      f"{' and '.join(plugin.modalities)} input only.")
        record["dataset"]["left_out"] = skipped
        return Dataset(kept, name=dataset.name)
    return dataset


def _report(cfg: RunConfig, record: dict[str, Any], result: Result) -> str:
    lines = [f"# {record['analysis']['name']} on {split_spec(cfg.model)[0]}", "",
             f"- checkpoint: {cfg.checkpoint or 'default'}", f"- data: {cfg.data or DEFAULT_DATA} "
             f"({record['dataset'].get('evaluated_items')} items)",
             f"- interventions: {json.dumps(record.get('interventions', []))}", "", "## Summary", ""]
    lines += [f"- {k}: {v}" for k, v in result.to_json()["summary"].items()]
    lines += ["", *[f"_{n}_" for n in result.notes]]
    return "\n".join(lines) + "\n"
