"""argparse for the entry points, without its start-up cost. Edge (the terminal's width).

argparse's `HelpFormatter` measures the terminal in its constructor, which imports `shutil` (and with it `bz2`
and `lzma`, ~1.5 ms and ~0.3 MiB per process) - and `add_argument` builds a formatter to check every argument,
so every daemon paid it at start although it never prints help. `ArgumentParser` here is argparse's own with a
formatter given the width `shutil.get_terminal_size` would give, found without importing shutil.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["ArgumentParser", "HelpFormatter"]


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter; with no `width`, the terminal's width as `shutil.get_terminal_size` gives it."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


def _columns() -> int:
    """`shutil.get_terminal_size().columns`: `$COLUMNS`, else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):  # no stdout (None), closed, not a terminal
            columns = 0
    return columns or 80


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose default formatter is `HelpFormatter` (also in its subcommands' parsers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
