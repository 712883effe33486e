"""Plugin discovery with pluggy and the ``lalm_probe`` entry-point group.

A plugin is a module with hook implementations (``@hookimpl def lalm_probe_models(): return [MyModel]``) named
by an entry point in the ``lalm_probe`` group, or an entry point naming one plugin class directly
(``mymodel = "my_package.models:MyModel"``). Built-ins are registered the same way as third-party packages.
A module that fails to import is skipped with a one-line warning naming it; two plugins that claim one name
are an error naming both.
"""

from __future__ import annotations

import importlib.metadata as md
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from .errors import PluginError, unknown_name
from .model import ModelPlugin
from .plugin import Analysis, Intervention

GROUP = "lalm_probe"
hookspec = pluggy.HookspecMarker(GROUP)
hookimpl = pluggy.HookimplMarker(GROUP)


class PluginWarning(UserWarning):
    """A plugin was skipped; the rest of the tool keeps working."""


class Specs:
    """Hook specifications: each returns a list of classes (or, for datasets, a name -> loader mapping)."""

    @hookspec
    def lalm_probe_models(self) -> list[type]:
        """Model plugin classes (subclasses of ``ModelPlugin``)."""

    @hookspec
    def lalm_probe_analyses(self) -> list[type]:
        """Analysis plugin classes (dataclass subclasses of ``Analysis``)."""

    @hookspec
    def lalm_probe_interventions(self) -> list[type]:
        """Intervention plugin classes (dataclass subclasses of ``Intervention``)."""

    @hookspec
    def lalm_probe_datasets(self) -> dict[str, Callable]:
        """Named dataset sources usable as ``--data NAME:ARG``."""

    @hookspec
    def lalm_probe_data_commands(self) -> list[type]:
        """``probe data NAME`` subcommands (subclasses of ``lalm_probe.core.commands.DataCommand``)."""

KINDS = {"model": "lalm_probe_models", "analysis": "lalm_probe_analyses", "intervention": "lalm_probe_interventions",
         "dataset": "lalm_probe_datasets", "data command": "lalm_probe_data_commands"}
BASES = {"model": ModelPlugin, "analysis": Analysis, "intervention": Intervention}


def _kind_of_class(obj: Any) -> str | None:
    """The plugin kind of a class named directly by an entry point, or None if it is not a plugin class."""
    if isinstance(obj, type):
        for kind, base in BASES.items():
            if issubclass(obj, base):
                return kind
    return None


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any
    package: str
    module: str


@dataclass
class Registry:
    """Every plugin found, by kind and name."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    skipped: list[str] = field(default_factory=list)

    def get(self, kind: str, name: str) -> Any:
        table = self.entries[kind]
        if name not in table:
            raise unknown_name(kind, name, table)
        return table[name].obj

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def dataset_sources(self) -> dict[str, Callable]:
        return {name: e.obj for name, e in self.entries["dataset"].items()}


def _entry_points() -> list[md.EntryPoint]:
    return list(md.entry_points(group=GROUP))


def _distribution(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown"


def discover(extra_modules: list[Any] | None = None) -> Registry:
    """Load every entry point of the group (plus ``extra_modules``: modules or plugin classes, for notebooks and
    tests) into a registry."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(Specs)
    reg = Registry()
    sources: list[tuple[Any, str]] = []
    classes: list[tuple[Any, str, str]] = []
    seen: set[str] = set()
    for ep in _entry_points():
        if ep.value in seen:  # the same module may be listed twice (editable + regular install)
            continue
        seen.add(ep.value)
        try:
            module = ep.load()
        except Exception as exc:  # any import-time failure of a third-party module must not break the tool
            msg = f"Skipping plugin '{ep.name}' ({ep.value}, from {_distribution(ep)}): {type(exc).__name__}: {exc}"
            reg.skipped.append(msg)
            warnings.warn(msg, PluginWarning, stacklevel=2)
            continue
        if isinstance(module, type):
            kind = _kind_of_class(module)
            if kind is None:
                raise PluginError(f"Entry point '{ep.name}' ({ep.value}, from {_distribution(ep)}) names a class that "
                                  "is not a ModelPlugin, Analysis or Intervention.")
            classes.append((module, kind, _distribution(ep)))
            continue
        sources.append((module, _distribution(ep)))
    for module in extra_modules or []:
        if isinstance(module, type) and _kind_of_class(module):
            classes.append((module, _kind_of_class(module), "registered in code"))
        else:
            sources.append((module, "registered in code"))
    package_of: dict[int, str] = {}
    for module, package in sources:
        try:
            pm.register(module)
        except ValueError:  # the same module under a second entry-point name
            continue
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"Plugin module {module.__name__} ({package}) has an invalid hook: {exc}") from None
        package_of[id(module)] = package
    for kind, hook in KINDS.items():
        for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):  # registration order
            found = impl.function() or []
            pairs = found.items() if isinstance(found, dict) else ((getattr(c, "name", None), c) for c in found)
            for name, obj in pairs:
                _add(reg, kind, name, obj, package_of[id(impl.plugin)], impl.plugin.__name__)
    for cls, kind, package in classes:
        _add(reg, kind, getattr(cls, "name", None), cls, package, cls.__module__)
    return reg


def _add(reg: Registry, kind: str, name: str | None, obj: Any, package: str, module: str) -> None:
    if not name:
        raise PluginError(f"Plugin module {module} ({package}) returned a {kind} without a 'name'.")
    table = reg.entries[kind]
    if name in table and table[name].obj is not obj:
        other = table[name]
        raise PluginError(f"Two plugins claim the {kind} name '{name}': {other.module} (from {other.package}) and "
                          f"{module} (from {package}). Uninstall one of them.")
    table[name] = Entry(kind, name, obj, package, module)
