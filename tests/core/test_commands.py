"""`probe data` subcommands come from plugins: one contributed by a package runs, a broken one is skipped."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
from helpers import add_entry_point
from lalm_probe.core.cli import main
from lalm_probe.core.commands import DataCommand, add_data_commands
from lalm_probe.core.errors import PluginError, UserError
from lalm_probe.core.registry import PluginWarning, discover, hookimpl


class Tones(DataCommand):
    """A third party's ``probe data tones``: writes a manifest of n items."""

    name = "tones"
    description = "write a manifest of test tones"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("out")
        parser.add_argument("--count", type=int, default=2)

    def run(self, args: argparse.Namespace) -> int:
        if args.count < 1:
            raise UserError(f"--count must be at least 1, got {args.count}.")
        lines = [json.dumps({"id": f"t{i}", "text": f"tone {i}"}) for i in range(args.count)]
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0


class Broken(DataCommand):
    name = "broken"
    description = "fails while declaring its options"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--x")
        raise RuntimeError("bad option table")


def plugin_module(monkeypatch: pytest.MonkeyPatch, name: str, *commands: type) -> types.ModuleType:
    """A module implementing the hook, installed as if its package declared an entry point for it."""
    module = types.ModuleType(name)
    module.lalm_probe_data_commands = hookimpl(lambda: list(commands))
    monkeypatch.setitem(sys.modules, name, module)
    add_entry_point(monkeypatch, name, name)
    return module


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_a_command_registered_in_code_is_found():
    module = types.ModuleType("in_code_commands")
    module.lalm_probe_data_commands = hookimpl(lambda: [Tones])
    reg = discover(extra_modules=[module])
    assert reg.entries["data command"]["tones"].obj is Tones
    assert reg.entries["data command"]["tones"].package == "registered in code"
    assert "synth" in reg.names("data command")


def test_a_plugin_contributed_data_command_runs(monkeypatch, capsys, tmp_path):
    plugin_module(monkeypatch, "third_party_tones", Tones)
    out = tmp_path / "tones.jsonl"
    code, _ = run_cli(capsys, "data", "tones", str(out), "--count", "3")
    assert code == 0 and [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == ["t0", "t1", "t2"]
    code, text = run_cli(capsys, "data", "tones", str(out), "--count", "0")
    assert code == 2 and text.count("error:") == 1 and "--count must be at least 1" in text
    code, text = run_cli(capsys, "list")
    assert code == 0 and "data command" in text and "tones" in text


def test_data_help_lists_plugin_commands_next_to_synth(monkeypatch, capsys):
    plugin_module(monkeypatch, "third_party_tones", Tones)
    with pytest.raises(SystemExit) as info:
        main(["data", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "{synth,tones}" in out and "write a manifest of test tones" in out


def test_a_command_module_that_fails_to_import_is_skipped_with_a_warning(monkeypatch, capsys, tmp_path):
    (tmp_path / "commands_boom.py").write_text("raise ImportError('needs a library you do not have')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    add_entry_point(monkeypatch, "boom", "commands_boom")
    with pytest.raises(SystemExit) as info:
        main(["data", "synth", "--help"])
    cap = capsys.readouterr()
    assert info.value.code == 0 and "--languages" in cap.out
    assert "warning: Skipping plugin 'boom'" in cap.err and "needs a library" in cap.err


def test_a_command_failing_to_declare_its_options_is_skipped_with_a_warning(monkeypatch, capsys, tmp_path):
    plugin_module(monkeypatch, "third_party_mixed", Broken, Tones)
    code, text = run_cli(capsys, "data", "tones", str(tmp_path / "t.jsonl"))
    assert code == 0 and (tmp_path / "t.jsonl").is_file()
    assert "warning: Skipping data command 'broken' (third_party_mixed" in text and "bad option table" in text
    with pytest.raises(SystemExit) as info:
        main(["data", "broken"])
    assert info.value.code == 2 and "invalid choice: 'broken'" in capsys.readouterr().err


def test_only_the_failing_command_is_left_out_of_the_parser():
    module = types.ModuleType("in_code_mixed")
    module.lalm_probe_data_commands = hookimpl(lambda: [Broken, Tones])
    entries = list(discover(extra_modules=[module]).entries["data command"].values())
    sub = argparse.ArgumentParser().add_subparsers()
    with pytest.warns(PluginWarning, match=r"Skipping data command 'broken' \(in_code_mixed, from registered in code\)"):
        add_data_commands(sub, entries)
    assert set(sub.choices) == {"synth", "tones"}
    assert sub.choices["tones"].parse_args(["x"]).count == 2  # options declared apart arrive intact


def test_two_plugins_with_one_command_name_is_an_error_naming_both(monkeypatch, capsys):
    class Impostor(Tones):
        name = "synth"

    plugin_module(monkeypatch, "impostor_commands", Impostor)
    code, text = run_cli(capsys, "data", "synth", "--help")
    assert code == 2 and "claim the data command name 'synth'" in text and "impostor_commands" in text
    with pytest.raises(PluginError):
        discover()
