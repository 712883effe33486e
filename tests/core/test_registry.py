"""Plugin discovery: built-ins and third-party packages through one entry-point group."""

from __future__ import annotations

import sys
import types

import pytest
from helpers import add_entry_point
from lalm_probe.core.errors import PluginError, UserError
from lalm_probe.core.registry import PluginWarning, discover, hookimpl


def test_builtins_come_from_entry_points():
    reg = discover()
    assert "qwen2audio" in reg.names("model")
    assert {"logitlens"} <= set(reg.names("analysis"))
    assert {"layer-enrich", "audio-mask"} <= set(reg.names("intervention"))
    assert reg.entries["model"]["qwen2audio"].package.startswith("lalm-probe")
    assert {"synth", "fleurs", "covost2", "commonvoice", "vctk", "sakura"} <= set(reg.names("dataset"))
    synth = reg.entries["data command"]["synth"]  # datasets are a plugin like any other
    assert synth.package.startswith("lalm-probe") and synth.module == "lalm_probe.plugins.datasets.hooks"


def test_example_third_party_package_is_discovered():
    pytest.importorskip("probe_plugin_example", reason="install examples/probe-plugin-example (done by .ci/run)")
    reg = discover()
    assert reg.entries["model"]["tiny-mean-lm"].package.startswith("probe-plugin-example")
    assert "norms" in reg.names("analysis") and "shift-layer" in reg.names("intervention")


def test_broken_plugin_is_skipped_with_a_warning_naming_it(monkeypatch):
    add_entry_point(monkeypatch, "broken", "lalm_probe_no_such_module_xyz")
    with pytest.warns(PluginWarning, match="Skipping plugin 'broken'"):
        reg = discover()
    assert "qwen2audio" in reg.names("model") and len(reg.skipped) == 1


def test_plugin_raising_at_import_is_skipped(monkeypatch, tmp_path):
    (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    add_entry_point(monkeypatch, "explodes", "explodes_on_import")
    with pytest.warns(PluginWarning, match="RuntimeError: boom"):
        assert "logitlens" in discover().names("analysis")


def test_two_plugins_with_one_name_is_an_error_naming_both(monkeypatch):
    from lalm_probe.plugins.models.qwen2audio import Qwen2Audio

    impostor = types.ModuleType("impostor_plugin")

    class Other(Qwen2Audio):
        name = "qwen2audio"

    impostor.lalm_probe_models = hookimpl(lambda: [Other])
    monkeypatch.setitem(sys.modules, "impostor_plugin", impostor)
    add_entry_point(monkeypatch, "impostor", "impostor_plugin")
    with pytest.raises(PluginError, match="claim the model name 'qwen2audio'") as info:
        discover()
    assert "lalm_probe.plugins.models.qwen2audio" in str(info.value) and "impostor_plugin" in str(info.value)


def test_unknown_names_list_what_exists_with_a_suggestion():
    reg = discover()
    with pytest.raises(UserError, match="Did you mean 'qwen2audio'.*Available: "):
        reg.get("model", "qwen2audo")
    with pytest.raises(UserError, match="Unknown analysis 'nothing-like-it'"):
        reg.get("analysis", "nothing-like-it")
