"""The ``probe`` command line: ``list``, ``info``, ``check``, ``run``, ``analyze``, ``collate`` and the ``data``
subcommands plugins contribute.

User errors print one line and exit with status 2; no traceback. Anything else is a bug and keeps its traceback.
The ``run``, ``check`` and ``collate`` modules are imported by their commands: they load transformers and nnsight
(about 0.6 s), which ``probe list`` and ``--help`` do not need.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import typing
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .commands import add_data_commands
from .errors import UserError
from .registry import Registry, discover
from .spec import split_spec
from .vocab import PATTERNS, VOCABULARY, describe, pattern_of

console = Console()
err_console = Console(stderr=True)


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings API
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


def _registry() -> Registry:
    return discover()


def show_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on a terminal; plain aligned text in a pipe. Cells are never truncated."""
    cells = [[str(c) for c in row] for row in rows]
    if console.is_terminal:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in cells:
            table.add_row(*(escape(c) for c in row))
        console.print(table)
        return
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    lines = [title, "  ".join(col.ljust(w) for col, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    print("\n".join(lines))


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry()
    rows, models = [], []
    for kind in ("model", "analysis", "intervention", "dataset", "data command"):
        for name in reg.names(kind):
            e = reg.entries[kind][name]
            about = getattr(e.obj, "description", "") or (e.obj.__doc__ or "").strip().split("\n")[0]
            if kind == "model":  # where its layers are and where its weights come from, without loading it
                stacks = [s.name for s in e.obj.stacks] + [f"{s} (at load)" for s in e.obj.stacks_at_load]
                models.append([name, e.package, ", ".join(stacks),
                               str(e.obj.default_checkpoint), about])
            else:
                rows.append([kind, name, e.package, about])
    model_columns = ("model", "package", "stacks", "default weights", "description")
    if args.json:
        print(json.dumps({"models": [dict(zip(model_columns, r)) for r in models],
                          "plugins": [dict(zip(("kind", "name", "package", "description"), r)) for r in rows],
                          "skipped": reg.skipped}, indent=1))
        return 0
    show_table("lalm-probe models (`--checkpoint` takes a hub id, a local folder or tiny)", model_columns, models)
    show_table("lalm-probe plugins", ("kind", "name", "package", "description"), rows)
    for line in reg.skipped:  # shown here too: PYTHONWARNINGS=ignore would hide the warning
        console.print(f"[yellow]skipped:[/yellow] {escape(line)}", soft_wrap=True, highlight=False)
    return 0


def _options(cls: type) -> list[list[str]]:
    """An analysis's or intervention's options: name, type, default, from its dataclass fields."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        kind = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append([f.name, kind, json.dumps(default, default=str) if default != "(required)" else default])
    return rows


def _load(args: argparse.Namespace) -> tuple[type, Any]:
    """The model class and a loader for ``--model NAME[:options] --checkpoint C``."""
    name, options = split_spec(args.model)
    cls = _registry().get("model", name)

    def load() -> Any:
        return cls.load(args.checkpoint or cls.default_checkpoint, device=args.device, dtype=args.dtype,
                        options=options)

    return cls, load


def cmd_info(args: argparse.Namespace) -> int:
    for kind, name in (("analysis", args.analysis), ("intervention", args.intervention)):
        if name:
            cls = _registry().get(kind, name)
            rows = _options(cls)
            if args.json:
                print(json.dumps({"name": name, "description": cls.description,
                                  "options": [dict(zip(("name", "type", "default"), r)) for r in rows]}, indent=1))
            else:
                show_table(f"{kind} {name}: {cls.description}", ("option", "type", "default"), rows)
                console.print(f"usage: --{kind} {name}:option=value,...  (or a JSON file "
                              '{"name": ..., "params": {...}})', soft_wrap=True, highlight=False)
            return 0
    if not args.model:
        if args.json:
            print(json.dumps({**VOCABULARY, **PATTERNS}, indent=1))
            return 0
        show_table("Canonical site components (stack.<layer>.<component>; <i> counts from 0)",
                   ("component", "what it is"), list(VOCABULARY.items()) + list(PATTERNS.items()))
        return 0
    cls, load = _load(args)
    plugin = load()
    stacks = plugin.describe()
    about = {"model": cls.name, "checkpoint": args.checkpoint or cls.default_checkpoint,
             "sample_rate": plugin.sample_rate, "input": list(cls.modalities), "lens_stack": cls.lens_stack,
             "options": plugin.options, "checkpoints": list(cls.hub_ids), "lens_caveat": cls.lens_caveat,
             "stacks": stacks}
    if args.json:
        print(json.dumps(about, indent=1, default=str))
        return 0
    for stack, d in stacks.items():
        rows = _component_rows(stack, d)
        rows += [[f"{stack}.{e}", w, "stack-level extra"] for e, w in d["extras"].items()]
        show_table(f"{stack}: {d['layers']} layers at {d['path']}, runs {d['runs'].replace('_', ' ')}"
                   f"{', logit lens' if d['lens'] else ''}", ("site", "width", "what it is"), rows)
    lines = [f"sample rate {plugin.sample_rate} Hz; input: {', '.join(cls.modalities)}; "
             f"logit lens stack: {cls.lens_stack or 'none'}"]
    if cls.option_defaults:
        show_table(f"options (--model {cls.name}:option=value,...)", ("option", "default", "what it does"),
                   [[k, str(cls.option_defaults[k]), cls.option_help.get(k, "")] for k in cls.option_defaults])
    if cls.lens_caveat:
        lines.append(f"logit lens: {cls.lens_caveat}")
    if cls.hub_ids:
        lines.append("checkpoints: " + ", ".join(cls.hub_ids))
    for line in lines:
        console.print(escape(line), soft_wrap=True, highlight=False)
    return 0


def _component_rows(stack: str, d: dict[str, Any]) -> list[list[Any]]:
    """One row per component, and one per pattern family (``lm.<0..47>.expert<0..127>_act``) where the first
    member stands, with the members' width (a list where they differ)."""
    layers = f"<0..{d['layers'] - 1}>"
    families: dict[str, dict[int, Any]] = {}
    rows: list[Any] = []
    for c, w in d["components"].items():
        pattern = pattern_of(c)
        if pattern is None:
            rows.append([f"{stack}.{layers}.{c}", w, describe(c) or "model-specific"])
            continue
        if pattern not in families:
            families[pattern] = {}
            rows.append(pattern)
        families[pattern][int(re.search(r"\d+", c).group())] = w
    for i, row in enumerate(rows):
        if isinstance(row, str):
            members = families[row]
            index = f"<0..{len(members) - 1}>" if sorted(members) == list(range(len(members))) else str(sorted(members))
            widths = list(members.values())
            width = widths[0] if all(w == widths[0] for w in widths) else widths
            rows[i] = [f"{stack}.{layers}.{row.replace('<i>', index)}", width, PATTERNS[row]]
    return rows


def cmd_check(args: argparse.Namespace) -> int:
    from .check import CHECKS, run_checks

    unknown = sorted(set(args.only or []) - set(CHECKS))
    if unknown:
        raise UserError(f"Unknown check(s) {unknown}; the checks are: {', '.join(CHECKS)}.")
    cls, load = _load(args)
    findings = run_checks(load, args.only)
    for f in findings:
        mark = "[green]ok[/green]  " if f.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {escape(f.check if f.ok else f.line())}", soft_wrap=True, highlight=False)
    failed = [f for f in findings if not f.ok]
    console.print(f"{cls.name} ({args.checkpoint or cls.default_checkpoint}): "
                  f"{'all checks pass' if not failed else f'{len(failed)} failure(s)'}.")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import DEFAULT_ANALYSIS, DEFAULT_MODEL, RunConfig, execute

    cfg = RunConfig(model=args.model or DEFAULT_MODEL, analysis=args.analysis or DEFAULT_ANALYSIS,
                    checkpoint=args.checkpoint, data=args.data, interventions=args.intervention or [], out=args.out,
                    device=args.device, dtype=args.dtype, device_map=args.device_map, batch_size=args.batch_size,
                    seed=args.seed, baseline=not args.no_baseline, force_target=args.force_target,
                    store_dtype=args.store_dtype, shard=args.shard)
    execute(cfg, _registry(), console)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .run import analyze_run

    analyze_run(Path(args.run_dir), args.analysis, _registry(), console)
    return 0


def cmd_collate(args: argparse.Namespace) -> int:
    from .collate import collate, load_runs, write

    split = lambda v: [x.strip() for x in (v or "").split(",") if x.strip()]  # noqa: E731
    rows = collate(load_runs(args.run_dirs), split(args.by), split(args.mean), split(args.correlate),
                   args.where or [])
    columns = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    show_table(f"{len(args.run_dirs)} runs", columns, [[fmt(row.get(c, "")) for c in columns] for row in rows])
    if args.out:
        console.print(f"Written to [bold]{write(rows, args.out)}[/bold]", soft_wrap=True)
    return 0


def _version() -> str:
    try:
        return metadata.version("lalm-probe")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_parser(registry: Registry | None = None) -> argparse.ArgumentParser:
    """The whole CLI; ``probe data`` gets the subcommands of ``registry``'s plugins (none without one)."""
    parser = argparse.ArgumentParser(prog="probe",
                                     description="Mechanistic interpretability for audio-language models.")
    parser.add_argument("--version", action="version", version=f"lalm-probe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="list installed model, analysis, intervention and dataset plugins")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=cmd_list)

    def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--model", required=required,
                       help="model plugin name (see `probe list`), optionally with options: whisper:language=de")
        p.add_argument("--checkpoint", help="hub id, local directory or 'tiny' (default: the plugin's)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])

    info = sub.add_parser("info", help="show a model's stacks, layer counts, sites and widths; without --model, "
                          "the canonical site vocabulary")
    model_args(info, required=False)
    info.add_argument("--analysis", help="show an analysis's options, their types and defaults")
    info.add_argument("--intervention", help="show an intervention's options, their types and defaults")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="run the conformance checks on a model plugin (exit 1 on a failure)")
    model_args(check)
    check.add_argument("--only", action="append", help="run only this check (repeatable)")
    check.set_defaults(func=cmd_check)

    run = sub.add_parser("run", help="collect activations and run one analysis; writes a run directory. "
                         "With no arguments: real Whisper base over built-in multilingual speech, logit lens")
    model_args(run, required=False)
    run.add_argument("--analysis", help="NAME, NAME:key=value,... or a JSON spec file (default: logitlens)")
    run.add_argument("--data", help="JSONL manifest or NAME:ARG dataset source (default: synth:demo)")
    run.add_argument("--intervention", action="append", help="NAME, NAME:key=value,... or a JSON file; repeatable")
    run.add_argument("--out", help="run directory (reuse one to resume an interrupted collection)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--device-map", help="e.g. 'auto' to spread a large model over several GPUs")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-baseline", action="store_true", help="with interventions, skip the uninterrupted run")
    run.add_argument("--force-target", help="label whose text is forced as the decoded prefix for step:/prefix: reads")
    run.add_argument("--store-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="how activations are stored on disk")
    run.add_argument("--shard", help="k/N: collect every N-th batch from the k-th into the same --out (N processes "
                     "split a run; taken from torchrun/accelerate when unset); rerun without it to merge and analyse")
    run.set_defaults(func=cmd_run)

    analyze = sub.add_parser("analyze", help="run an analysis on a finished run's collection (collects only what "
                             "is missing); writes RUN_DIR/analyses/<name>/")
    analyze.add_argument("run_dir", help="a run folder written by `probe run`")
    analyze.add_argument("--analysis", required=True, help="NAME, NAME:key=value,... or a JSON spec file")
    analyze.set_defaults(func=cmd_analyze)

    collate = sub.add_parser("collate", help="one table over several run folders: means per group (--mean) and "
                             "Pearson r between two summary values (--correlate), e.g. AudioLens Tables II and III")
    collate.add_argument("run_dirs", nargs="+", help="finished run folders")
    collate.add_argument("--by", help="settings that group the runs, e.g. model,attribute")
    collate.add_argument("--mean", help="summary values to average per group, e.g. critical_layer,accuracy")
    collate.add_argument("--correlate", help="two summary values to correlate per group, e.g. critical_layer,accuracy")
    collate.add_argument("--where", action="append", help="keep runs with name=value or name!=value (repeatable)")
    collate.add_argument("--out", help="also write the rows to this JSON file")
    collate.set_defaults(func=cmd_collate)

    data = sub.add_parser("data", help="build datasets").add_subparsers(dest="data_command", required=True)
    if registry is not None:
        add_data_commands(data, list(registry.entries["data command"].values()))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``probe`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _one_line_warnings()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter is not the user's business
    hf_logging.disable_progress_bar()  # our own progress bars say what is going on
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # plugins are imported only for `probe data`, the one command whose options they define before parsing
        args = build_parser(_registry() if argv[:1] == ["data"] else None).parse_args(argv)
        return args.func(args)
    except UserError as exc:
        # one line, never wrapped; escape keeps [lists] in messages
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as exc:
        folder = getattr(exc, "run_folder", None)
        where = f" --out {folder}" if folder else " --out"
        err_console.print(f"[red]interrupted[/red]; rerun the same command with{escape(where)} to resume.",
                          soft_wrap=True, highlight=False)
        return 130
    except BrokenPipeError:  # `probe list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except OSError as exc:  # the file system: a full disk, a read-only folder, a permission
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        err_console.print(f"[red]error:[/red] {escape(exc.strerror or str(exc))}: {escape(str(exc.filename or ''))}",
                          highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
