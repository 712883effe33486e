"""The README cannot drift: every `probe` command and every Python block in it runs, against tiny models.

Commands run in a scratch folder, in order (``probe analyze`` reuses the run before it). A command that would load
a real checkpoint gets ``--checkpoint tiny``; everything else is run as written. The set-up commands (apt-get, pip)
are what ``.ci/run`` itself runs.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from pathlib import Path

import pytest
import tomllib
from lalm_probe.core.cli import main

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def probe_commands() -> list[str]:
    """Every `probe ...` line of the README's bash blocks, continuations joined and comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("probe "):
                out.append(" ".join(line.split()))
    return out


def test_the_readme_shows_the_commands_it_promises():
    commands = probe_commands()
    for verb in ("list", "info", "check", "run", "analyze", "data synth"):
        assert any(c.startswith(f"probe {verb}") for c in commands), verb


def test_every_probe_command_in_the_readme_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in probe_commands():
        argv = shlex.split(command)[1:]
        if argv[0] in ("run", "info", "check") and "--checkpoint" not in argv and (argv[0] == "run" or "--model"
                                                                                   in argv):
            argv += ["--checkpoint", "tiny"]
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, f"{command}\n{out.err}"
    assert (tmp_path / "runs/gender/analyses/logitlens/results.json").is_file()
    assert (tmp_path / "runs/asr/outputs.jsonl").is_file() and list((tmp_path / "data/demo").glob("**/*.wav"))


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_every_python_block_in_the_readme_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"readme_block_{number}")  # a real module: dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(blocks("python")[number], f"README.md python block {number}", "exec"), module.__dict__)


def test_the_toml_in_the_readme_parses():
    for block in blocks("toml"):
        assert tomllib.loads(block)["project"]["entry-points"]["lalm_probe"]
