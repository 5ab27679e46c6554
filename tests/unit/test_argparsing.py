"""The entry points' parsers print the help argparse would print, at any terminal width, without measuring the
terminal (importing shutil, bz2, lzma) while they are built."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import cli
from agent.compat import aa, cdh, rest

REPO = Path(__file__).resolve().parents[2]
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "cvm-agent": cli.build_parser,
    "attestation-agent": aa.build_parser,
    "confidential-data-hub": cdh.build_parser,
    "api-server-rest": rest.build_parser,
}


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _subparsers(sub)
    return found


@pytest.mark.parametrize("columns", ["40", "80", "132"])
@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_and_usage_are_argparses_own(name: str, columns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    parsers = _subparsers(PARSERS[name]())
    ours = [(p.format_help(), p.format_usage()) for p in parsers]
    for parser in parsers:
        parser.formatter_class = argparse.HelpFormatter
    assert ours == [(p.format_help(), p.format_usage()) for p in parsers]
    assert len(ours) > (10 if name == "cvm-agent" else 0)  # the subcommands were compared too


@pytest.mark.parametrize("module", ["agent.cli", "agent.compat.aa", "agent.compat.cdh", "agent.compat.rest"])
def test_building_a_parser_does_not_measure_the_terminal(module: str) -> None:
    code = f"import sys; from {module} import build_parser; build_parser(); print('shutil' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("columns", [None, "", "0", "abc", "100"])
def test_the_width_is_shutils(columns: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from agent import argparsing

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert argparsing._columns() == shutil.get_terminal_size().columns
