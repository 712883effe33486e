"""One ``probe run`` (and ``probe analyze``): load, calibrate, collect, analyse, write one run folder.

The folder holds ``run.json`` (config, versions, seed, status, stores), the activation stores under ``store/``,
``results.json``, ``arrays.npz``, ``plots/*.png`` and ``report.md``; ``probe analyze`` adds ``analyses/<name>/``.
The stages are explicit: interventions that learn from data are calibrated first on their own store, then the
baseline (and intervened) activations and outputs are collected, then the analysis turns stores into a result. An
analysis never runs the model, so ``probe analyze RUN_DIR --analysis SPEC`` reruns any analysis on the stored
collection, collecting only what is missing.
"""

from __future__ import annotations

import hashlib
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

from .audio import check_audio
from .collect import collect, write_outputs
from .data import Dataset, resolve_dataset
from .engine import Session
from .errors import UserError
from .outputs import OutputStore
from .plugin import Analysis, Intervention, Stores, VariantRun
from .registry import Registry
from .results import Result, render, report, write_result
from .rundir import differing_setting, locked, make_folder, read_record, write_record
from .spec import build_params, spec_to_json, split_spec
from .steps import step_of
from .store import ActivationStore
from .sweep import Variant, edits_key, expand
from .threads import analysis_threads

DEFAULT_DATA = "synth:demo"  # 4 sentences x 7 languages, one voice: a first run in about a minute
# `probe run` with no arguments: real Whisper base (offline weights) over built-in multilingual speech, with the
# logit lens on the decoder where Whisper identifies the language.
DEFAULT_MODEL = "whisper"
DEFAULT_ANALYSIS = "logitlens:label=language,positions=last"
LAYERS = ("Layers are numbered by site index from 0: layer l is the output of block l+1, read at <stack>.l.out "
          "(add 1 for the papers' numbering from 1).")


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
    store_dtype: str = "float32"  # float32, float16 or bfloat16 on disk
    shard: str | None = None  # "k/N": collect every N-th batch from the k-th (torchrun / accelerate: automatic)


def build_spec(registry: Registry, kind: str, spec: str | dict[str, Any]) -> Any:
    """Turn ``NAME[:k=v,...]``, a JSON file or a saved ``{"name", "params"}`` into a typed plugin object."""
    name, params = (spec["name"], spec["params"]) if isinstance(spec, dict) else split_spec(spec)
    return build_params(registry.get(kind, name), params, f"{kind} '{name}'")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("lalm-probe", "torch", "transformers", "nnsight", "numpy", "scikit-learn", "librosa"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def shard_of(spec: str | None) -> tuple[int, int]:
    """``(k, N)`` from ``--shard k/N``, else from torchrun / accelerate (``RANK``, ``WORLD_SIZE``), else (0, 1)."""
    if spec is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        spec = f"{rank}/{world}" if rank is not None and world is not None else "0/1"
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like k/N (e.g. 0/4), not '{spec}'.") from None
    if not 0 <= k < n:
        raise UserError(f"--shard {spec}: k must be in 0..N-1.")
    return k, n


def _identity(cfg: RunConfig, checkpoint: str, role: str, edits: list[Any], prompts: str,
              force_target: str | None) -> dict[str, Any]:
    return {"model": cfg.model, "checkpoint": checkpoint, "dtype": cfg.dtype, "role": role, "edits": edits,
            "prompts": prompts, "force_target": force_target}


def _store(out: Path, identity: dict[str, Any], dtype: str) -> ActivationStore:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return ActivationStore(out / "store" / f"{identity['role']}-{digest}", identity, dtype)


def _prompts_key(analysis: Analysis, model: Any, dataset: Dataset, prompt_fn: Any = None) -> str:
    """The distinct prompts an analysis (or ``prompt_fn``) shows the model: rows collected under other prompts are
    another store."""
    prompt_fn = prompt_fn or (lambda it: analysis.prompt(model, it))
    seen = sorted({json.dumps([p.user, p.assistant_prefix]) for p in map(prompt_fn, dataset)})
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()[:16]


def expanded_items(variants: list[Variant], dataset: Dataset) -> Dataset:
    """The items evaluated under the interventions (a patch sweep's copies, one per condition; see
    Intervention.expand); every variant of a sweep must evaluate the same ones."""
    expanded = []
    for v in variants:
        items = dataset
        for iv in v.interventions:
            items = iv.expand(items)
        expanded.append(items)
    return _one_evaluation(variants, expanded, dataset)


def _one_evaluation(variants: list[Variant], evaluated: list[Dataset], default: Dataset) -> Dataset:
    """The items every variant evaluates (the method and its baselines are compared on one evaluation set)."""
    for v, items in zip(variants[1:], evaluated[1:]):
        if [it.id for it in items] != [it.id for it in evaluated[0]]:
            raise UserError(f"The variants of this sweep evaluate different items ('{variants[0].name}' and "
                            f"'{v.name}'); sweep only parameters that keep the evaluated items the same.")
    return evaluated[0] if evaluated else default


class Pipeline:
    """The stages of one run over a loaded session; shared by ``probe run`` and ``probe analyze``."""

    def __init__(self, cfg: RunConfig, session: Session, out: Path, record: dict[str, Any], console: Any) -> None:
        self.cfg, self.session, self.out, self.record, self.console = cfg, session, out, record, console
        self.view = session.view
        self.checkpoint = cfg.checkpoint or session.plugin.default_checkpoint
        self.shard = shard_of(cfg.shard)

    def usable(self, dataset: Dataset, seconds: dict[str, float]) -> Dataset:
        """The items the model can take (Whisper takes speech only), saying how many were left out; a clip longer
        than the model reads whole is refused (``seconds``: each clip's duration, from the audio check)."""
        plugin = self.session.plugin
        limit = plugin.max_seconds()
        long = sorted((s, i) for i, s in seconds.items() if limit is not None and s > limit + 1e-3)
        if long:
            raise UserError(f"{len(long)} clips are longer than the {limit:g} s '{plugin.name}' reads whole (e.g. "
                            f"'{long[-1][1]}', {long[-1][0]:.1f} s); it would cut the rest, so split them first.")
        kept = [it for it in dataset if plugin.accepts(it)]
        if not kept:
            raise UserError(f"None of the {len(dataset)} items can be fed to '{plugin.name}', which takes "
                            f"{' and '.join(plugin.modalities)} input.")
        if len(kept) < len(dataset):
            left = len(dataset) - len(kept)
            self.console.print(f"[yellow]Leaving out {left} of {len(dataset)} items[/yellow]: '{plugin.name}' takes "
                               f"{' and '.join(plugin.modalities)} input only.")
            self.record["dataset"]["left_out"] = left
            return Dataset(kept, name=dataset.name)
        return dataset

    def calibrate(self, interventions: list[Intervention], analysis: Analysis, dataset: Dataset) -> Dataset:
        """Collect each intervention's calibration data and let it resolve its parameters. Calibrations collect
        without edits, so they share one store (the variants of a sweep calibrate on the same rows)."""
        for iv in interventions:
            calibration = iv.calibration(self.view, dataset, analysis)
            if calibration is None:
                continue
            prompt_fn = calibration.prompt or (lambda it: analysis.prompt(self.view, it))
            identity = _identity(self.cfg, self.checkpoint, "calibration", [],
                                 _prompts_key(analysis, self.view, calibration.items, prompt_fn), None)
            store = collect(self.session, calibration.items, calibration.requirements.reads(),
                            _store(self.out, identity, self.cfg.store_dtype), batch_size=self.cfg.batch_size,
                            prompt_fn=prompt_fn, description=f"Calibrating ({iv.name})")
            iv.calibrate(self.view, calibration, store, analysis)
            dataset = calibration.evaluate
        return dataset

    def collect(self, analysis: Analysis, dataset: Dataset, variants: list[Variant]) -> Stores:
        """Baseline and intervened activations (and outputs) for what the analysis requires; with a sweep (several
        variants), one intervened collection per distinct set of edits, handed over as ``Stores.variants``."""
        req = analysis.requirements(self.view, dataset)
        for key in req.labels:
            dataset.label_values(key)  # every item must carry the labels before any model time is spent
        steps = any(step_of(p) for r in req.reads() for p in r.positions)
        if self.cfg.force_target and not steps:
            raise UserError(f"--force-target forces the decoded prefix for step:/prefix: reads, and analysis "
                            f"'{analysis.name}' reads none; drop it (or read decode steps).")
        self._force_target = self.cfg.force_target or req.force_target
        self._prompts = _prompts_key(analysis, self.view, dataset)
        edits = [[e for iv in v.interventions for e in iv.edits(self.view)] for v in variants]
        stores = Stores()
        if self.cfg.baseline or not any(edits):
            stores.baseline, stores.baseline_outputs = self._collect_role(
                analysis, dataset, req, "baseline", [], [], any(edits))
        if len(variants) == 1 and edits[0]:
            specs = [spec_to_json(iv) for iv in variants[0].interventions]
            stores.intervened, stores.intervened_outputs = self._collect_role(
                analysis, dataset, req, "intervened", edits[0], specs, False)
        elif len(variants) > 1:
            done: dict[str, tuple] = {}
            for v, v_edits in zip(variants, edits):
                key = edits_key(v_edits)
                if key not in done:  # variants that edit identically (a seed the method ignores) share a store
                    specs = [spec_to_json(iv) for iv in v.interventions]
                    done[key] = self._collect_role(analysis, dataset, req, "intervened", v_edits, specs, False,
                                                   variant=v.name)
                stores.variants.append(VariantRun(v.name, v.params, *done[key]))
        return stores

    def _collect_role(self, analysis: Analysis, dataset: Dataset, req: Any, role: str, edits: list[Any],
                      specs: list[Any], intervened_too: bool, variant: str | None = None) -> tuple[Any, Any]:
        """One collection (activations and, if required, outputs) under ``edits``."""
        prompt_fn = lambda it: analysis.prompt(self.view, it)  # noqa: E731
        store = outputs = None
        if req.reads():
            store = _store(self.out, _identity(self.cfg, self.checkpoint, role, specs, self._prompts,
                                               self._force_target), self.cfg.store_dtype)
            where = str(store.root.relative_to(self.out))
            if variant is None:
                self.record.setdefault("stores", {})[role] = where
            else:
                self.record.setdefault("stores", {}).setdefault("variants", {})[variant] = where
            if self.shard[1] > 1:
                store = store.part(*self.shard)
            collect(self.session, dataset, req.reads(), store, batch_size=self.cfg.batch_size, edits=edits,
                    prompt_fn=prompt_fn, force_target=self._force_target, shard=self.shard,
                    description=f"Collecting ({variant or role})")
        if req.generate and self.shard[1] == 1:
            if variant is not None:
                path = self.out / "outputs" / f"{_slug(variant)}.jsonl"
                path.parent.mkdir(exist_ok=True)
            else:  # outputs.jsonl holds what this run's settings produced
                path = self.out / ("baseline_outputs.jsonl" if role == "baseline" and intervened_too
                                   else "outputs.jsonl")
            outputs = write_outputs(self.session, dataset, OutputStore(path), req.generate,
                                    batch_size=self.cfg.batch_size, edits=edits, prompt_fn=prompt_fn,
                                    description=f"Generating ({variant or role})")
        return store, outputs

    def analyze(self, analysis: Analysis, dataset: Dataset, stores: Stores, where: Path) -> tuple[Result, list[Path]]:
        with analysis_threads():  # t-SNE and SVD crawl when BLAS threads fight over a small machine
            result = analysis.analyze(self.view, dataset, stores)
        result.summary.setdefault("layer_numbering", LAYERS)
        result.arrays.setdefault("item_ids", np.array([it.id for it in dataset]))  # rows of per-item arrays
        where.mkdir(parents=True, exist_ok=True)
        written = write_result(result, where)
        (where / "report.md").write_text(report(self.record, result, where), encoding="utf-8")
        return result, written + [where / "report.md"]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text.replace(", ", "_"))[:120]


def _calibrate_variants(pipe: Pipeline, variants: list[Variant], analysis: Analysis, dataset: Dataset) -> Dataset:
    """Calibrate every variant; all must evaluate the same items."""
    return _one_evaluation(variants, [pipe.calibrate(v.interventions, analysis, dataset) for v in variants], dataset)


def _record_variants(record: dict[str, Any], variants: list[Variant]) -> None:
    """The resolved specs: one list for a plain run, one per variant for a sweep (so ``probe analyze`` reuses
    each variant's calibration and store)."""
    if len(variants) == 1:
        record["interventions"] = [spec_to_json(iv) for iv in variants[0].interventions]
        return
    record["interventions"] = []
    record["sweep"] = {"params": list(variants[0].params), "variants": [
        {"name": v.name, "params": v.params, "interventions": [spec_to_json(iv) for iv in v.interventions]}
        for v in variants]}


def _nothing_kept(out: Path, record: dict[str, Any]) -> bool:
    """A run that failed before collecting anything (a mistyped option found after loading) holds nothing worth
    protecting, so a corrected command may take its folder."""
    return record.get("status") in ("failed", "interrupted") and not any((out / "store").glob("**/segments/*/*"))


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load(cfg: RunConfig, registry: Registry, console: Any) -> Session:
    name, options = split_spec(cfg.model)
    cls = registry.get("model", name)
    checkpoint = cfg.checkpoint or cls.default_checkpoint
    console.print(f"Loading [bold]{name}[/bold] ({checkpoint}) …")
    return Session(cls.load(checkpoint, device=process_device(cfg.device), dtype=cfg.dtype,
                            device_map=cfg.device_map, options=options))


def process_device(device: str) -> str:
    """``--device cuda`` under torchrun / accelerate (``LOCAL_RANK`` set) is this process's own GPU, so the shards
    of one machine do not all load onto GPU 0; an explicit ``cuda:i`` is kept."""
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(local)}" if device == "cuda" and local is not None and local.isdigit() else device


def execute(cfg: RunConfig, registry: Registry, console: Any) -> tuple[Path, Result | None]:
    """Run one analysis end to end; returns the run folder and the result (None for a shard, which only collects)."""
    _seed(cfg.seed)
    model_name = split_spec(cfg.model)[0]
    registry.get("model", model_name)
    if not cfg.baseline and not cfg.interventions:
        raise UserError("--no-baseline leaves out the run without interventions, and there is no --intervention; "
                        "drop --no-baseline (or add an intervention).")
    analysis = build_spec(registry, "analysis", cfg.analysis)
    variants = expand(registry, cfg.interventions)
    dataset = resolve_dataset(cfg.data or DEFAULT_DATA, registry.dataset_sources())
    analysis.check(dataset)
    for iv in variants[0].interventions:
        iv.check(dataset, analysis)
    seconds = check_audio(dataset)  # every clip decodes, before any model time is spent
    k, n = shard_of(cfg.shard)
    out = make_folder(Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{model_name}-{analysis.name}"))
    with locked(out, ".lock" if n == 1 else f".lock-{k}-of-{n}"):
        old = read_record(out)
        config = asdict(cfg)
        if old is not None and (why := differing_setting(old["config"], config)) and not _nothing_kept(out, old):
            raise UserError(f"{out} holds another run ({why}); rerun with the same settings to resume it, or "
                            "choose another --out folder.")
        record = {"status": "running", "config": config, "analysis": spec_to_json(analysis), "versions": versions(),
                  "seed": cfg.seed, "dataset": {"name": dataset.name, "items": len(dataset)}, "layers": LAYERS}
        if n == 1:
            write_record(out, record)
        try:
            pipe = Pipeline(cfg, _load(cfg, registry, console), out, record, console)
            dataset = pipe.usable(dataset, seconds)
            dataset = _calibrate_variants(pipe, variants, analysis, dataset)
            _record_variants(record, variants)  # calibrated values included
            record["dataset"].update({"evaluated_items": len(dataset), "ids": [it.id for it in dataset]})
            dataset = expanded_items(variants, dataset)
            stores = pipe.collect(analysis, dataset, variants)
            if n > 1:
                console.print(f"Shard {k}/{n} collected into {out}. When every shard is done, run the same command "
                              "without --shard to merge and analyse.", soft_wrap=True)
                return out, None
            result, written = pipe.analyze(analysis, dataset, stores, out)
            outputs = sorted(p.name for p in out.glob("*outputs.jsonl"))
            record.update(status="complete", files=[str(p.relative_to(out)) for p in written] + outputs)
            write_record(out, record)
        except BaseException as exc:
            if n == 1:
                record.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                              error=f"{type(exc).__name__}: {exc}")
                write_record(out, record)
            exc.run_folder = out  # type: ignore[attr-defined]  # the CLI says where to resume
            raise
    render(result, console, f"{analysis.name} on {cfg.model}")
    console.print(f"Run written to [bold]{out}[/bold]", soft_wrap=True)
    return out, result


def analyze_run(run_dir: Path, spec: str, registry: Registry, console: Any) -> tuple[Path, Result]:
    """Rerun an analysis on a finished run's collection (collecting only what is missing); writes
    ``analyses/<name>[-n]/`` next to the run's own result."""
    old = read_record(run_dir)
    if old is None or old.get("status") != "complete":
        raise UserError(f"{run_dir} is not a finished run (no complete run.json); finish it with `probe run` first.")
    cfg = RunConfig(**old["config"])
    _seed(cfg.seed)
    analysis = build_spec(registry, "analysis", spec)
    if "sweep" in old:  # each variant as it was resolved (calibrated again only for what a spec still reads)
        variants = [Variant(v["name"], v["params"], [build_spec(registry, "intervention", s) for s in
                                                     v["interventions"]]) for v in old["sweep"]["variants"]]
    else:
        variants = [Variant("", {}, [build_spec(registry, "intervention", s) for s in old.get("interventions", [])])]
    full = {it.id: it for it in resolve_dataset(cfg.data or DEFAULT_DATA, registry.dataset_sources())}
    missing = [i for i in old["dataset"]["ids"] if i not in full]
    if missing:
        raise UserError(f"The run's data no longer holds item '{missing[0]}'; `probe analyze` needs the same data.")
    dataset = Dataset([full[i] for i in old["dataset"]["ids"]], name=old["dataset"]["name"])
    analysis.check(dataset)
    with locked(run_dir):
        record = dict(old)
        pipe = Pipeline(cfg, _load(cfg, registry, console), run_dir, record, console)
        # what a resolved spec still learns from data (patch: the source states) comes from its calibration store
        dataset = expanded_items(variants, _calibrate_variants(pipe, variants, analysis, dataset))
        stores = pipe.collect(analysis, dataset, variants)
        used, record["stores"] = record.get("stores"), old.get("stores")  # the run's own stores stay its record
        slug = analysis.name
        n = 1
        while (run_dir / "analyses" / slug).exists():
            n += 1
            slug = f"{analysis.name}-{n}"
        result, written = pipe.analyze(analysis, dataset, stores, run_dir / "analyses" / slug)
        record.setdefault("analyses", []).append({"analysis": spec_to_json(analysis), "dir": f"analyses/{slug}",
                                                  "stores": used,
                                                  "files": [str(p.relative_to(run_dir)) for p in written]})
        write_record(run_dir, record)
    render(result, console, f"{analysis.name} on {cfg.model}")
    console.print(f"Analysis written to [bold]{run_dir / 'analyses' / slug}[/bold]", soft_wrap=True)
    return run_dir / "analyses" / slug, result
