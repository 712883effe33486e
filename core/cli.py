"""The ``probe`` command line: ``list``, ``info``, ``run`` and the ``data`` subcommands that plugins contribute.

User errors print one line and exit with status 2; no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .commands import add_data_commands
from .errors import UserError
from .registry import Registry, discover

console = Console()
err_console = Console(stderr=True)


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings API
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)

    warnings.showwarning = show


def _registry() -> Registry:
    return discover()


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry()
    table = Table(title="lalm-probe plugins")
    for col in ("kind", "name", "package", "description"):
        table.add_column(col)
    for kind in ("model", "analysis", "intervention", "dataset", "data command"):
        for name in reg.names(kind):
            e = reg.entries[kind][name]
            table.add_row(kind, name, e.package, getattr(e.obj, "description", "") or (e.obj.__doc__ or "").strip()
                          .split("\n")[0])
    console.print(table)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .spec import split_spec

    reg = _registry()
    name, options = split_spec(args.model)
    cls = reg.get("model", name)
    plugin = cls.load(args.checkpoint or cls.default_checkpoint, device=args.device, dtype=args.dtype)
    plugin.configure(**options)
    table = Table(title=f"{name} ({args.checkpoint or cls.default_checkpoint})")
    for col in ("stack", "layers", "runs", "sites (stack.<layer>.X)", "extras", "module path"):
        table.add_column(col)
    for name, d in plugin.describe().items():
        table.add_row(name, str(d["layers"]), d["runs"], ", ".join(d["components"]), ", ".join(d["extras"]),
                      d["path"])
    console.print(table)
    console.print(f"sample rate {plugin.sample_rate} Hz; input: {', '.join(cls.modalities)}; "
                  f"logit lens stack: {cls.lens_stack or 'none'}")
    if cls.option_defaults:
        console.print("options: " + ", ".join(f"{k}={v}" for k, v in plugin.options.items()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import DEFAULT_ANALYSIS, DEFAULT_MODEL, RunConfig, execute

    cfg = RunConfig(model=args.model or DEFAULT_MODEL, analysis=args.analysis or DEFAULT_ANALYSIS,
                    checkpoint=args.checkpoint, data=args.data, interventions=args.intervention or [], out=args.out,
                    device=args.device, dtype=args.dtype, device_map=args.device_map, batch_size=args.batch_size,
                    seed=args.seed, baseline=not args.no_baseline, force_target=args.force_target)
    execute(cfg, _registry(), console)
    return 0


def build_parser(registry: Registry | None = None) -> argparse.ArgumentParser:
    """The whole CLI; ``probe data`` gets the subcommands of ``registry``'s plugins (none without one)."""
    parser = argparse.ArgumentParser(prog="probe", description="Mechanistic interpretability for audio-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list installed model, analysis, intervention and dataset plugins"
                   ).set_defaults(func=cmd_list)

    def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--model", required=required,
                       help="model plugin name (see `probe list`), optionally with options: whisper:language=de")
        p.add_argument("--checkpoint", help="hub id, local directory or 'tiny' (default: the plugin's)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
        p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])

    info = sub.add_parser("info", help="show a model's stacks, layer counts and sites")
    model_args(info)
    info.set_defaults(func=cmd_info)

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
    run.set_defaults(func=cmd_run)

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
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)  # keeps [lists]
        return 2
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]; rerun with the same --out to resume the collection.")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
