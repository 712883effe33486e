"""``probe data NAME`` subcommands contributed by plugins through the ``lalm_probe_data_commands`` hook.

A data command builds or indexes a dataset (``probe data synth`` renders speech); the CLI gives each one a
subparser under ``probe data`` and calls its :meth:`DataCommand.run` with the parsed arguments::

    class MyCorpus(DataCommand):
        name = "mycorpus"
        description = "write a manifest for my corpus"

        def add_arguments(self, parser):
            parser.add_argument("root")

        def run(self, args):
            ...
            return 0

    @hookimpl
    def lalm_probe_data_commands():
        return [MyCorpus]

A command whose ``add_arguments`` fails is left out with a warning naming it; the other commands keep working.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any, ClassVar

from .registry import Entry, PluginWarning


class DataCommand:
    """Base class of a ``probe data`` subcommand: a name, a one-line description, its options and its work."""

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the command's options on its own subparser."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the work and return the exit status; raise ``UserError`` for the user's mistakes (exit 2)."""
        raise NotImplementedError


def add_data_commands(subparsers: Any, entries: list[Entry]) -> None:
    """Give every registered data command a subparser of ``probe data`` that runs it."""
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            command = entry.obj()
            options = argparse.ArgumentParser(add_help=False)  # built apart, so a failure leaves no half parser
            command.add_arguments(options)
        except Exception as exc:  # a third-party command must not break the rest of the CLI
            warnings.warn(f"Skipping data command '{entry.name}' ({entry.module}, from {entry.package}): "
                          f"{type(exc).__name__}: {exc}", PluginWarning, stacklevel=2)
            continue
        parser = subparsers.add_parser(entry.name, parents=[options], help=command.description)
        parser.set_defaults(func=command.run)
