"""Shared start-up pieces of the reference-compatible binaries. Edge (env, files, signals)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent import log as agent_log
from agent import sdnotify
from agent.compat.refconfig import KbcParams, cmdline_value, parse_kbc_params
from agent.errors import AgentError, ConfigError
from agent.log import get_logger

__all__ = [
    "add_version_flag",
    "configure_logging",
    "discover_kbc",
    "read_kernel_cmdline",
    "run_command",
    "serve_translated",
    "wait_for_stop",
]

log = get_logger("agent.compat")

DEFAULT_CMDLINE = "/proc/cmdline"
_RUST_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "error": "error", "off": "error"}


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """`-V`/`--version`, as the reference binaries (clap) answer it: the program name and the package version."""
    from agent import __version__

    parser.add_argument("-V", "--version", action="version", version=f"{parser.prog} {__version__} (cvm-agent)")


def configure_logging(config_level: str | None, flag_level: str | None) -> None:
    """`--log-level` wins, then `RUST_LOG` (as the reference), then the config's `[log] level`, then info."""
    level = flag_level
    if level is None and os.environ.get("RUST_LOG"):
        first = os.environ["RUST_LOG"].split(",")[0].rpartition("=")[2].lower()
        level = _RUST_LEVELS.get(first)
    agent_log.configure(level or config_level or "info", "auto", defer=True)  # structlog loads after serving


def read_kernel_cmdline(path: str | None) -> str:
    """The kernel command line (`--kernel-cmdline`, `$CVM_AGENT_KERNEL_CMDLINE`, else /proc/cmdline)."""
    name = path or os.environ.get("CVM_AGENT_KERNEL_CMDLINE") or DEFAULT_CMDLINE
    try:
        return Path(name).read_text(errors="replace")[: 64 * 1024]
    except OSError:
        if path is not None:
            msg = f"--kernel-cmdline {path!r} cannot be read"
            raise ConfigError(msg, key="--kernel-cmdline") from None
        return ""


def discover_kbc(config_url: str | None, cmdline: str) -> tuple[KbcParams | None, str]:
    """The KBS, as the reference finds it: config file, then `AA_KBC_PARAMS`, then `agent.aa_kbc_params`."""
    if config_url is not None:
        return KbcParams(name="cc_kbc", url=config_url), "config file"
    env = os.environ.get("AA_KBC_PARAMS")
    if env:
        return parse_kbc_params(env, source="AA_KBC_PARAMS"), "AA_KBC_PARAMS"
    value = cmdline_value(cmdline, "agent.aa_kbc_params")
    if value:
        return parse_kbc_params(value, source="agent.aa_kbc_params"), "kernel command line"
    return None, "none"


def serve_translated(
    prog: str, name: str, args: argparse.Namespace, to_config: Callable[[argparse.Namespace], tuple[Any, str | None]]
) -> int:
    """A reference-compatible binary: translate its inputs with `to_config` into a `Config` (and a log level),
    then serve it through the composition root until a stop signal."""

    async def start() -> int:
        from agent.app import run

        configure_logging(None, args.log_level)  # messages while translating are formatted already
        config, level = to_config(args)
        configure_logging(level, args.log_level)
        return int(await run(config, name=name))

    return run_command(prog, start)


def run_command(prog: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command's coroutine; configuration errors exit 2, agent errors 1, each as one stderr line."""
    try:
        try:
            return asyncio.run(main())
        finally:
            agent_log.release()  # the lines logged so far come before any report of a failure
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"{prog}: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an agent bug: one line without values, never a traceback
        if not agent_log.is_configured():
            agent_log.configure("error")
        agent_log.log_crash(f"{prog}.crash", exc)
        return 1


async def wait_for_stop() -> None:
    """Return on SIGTERM, SIGINT or SIGHUP (the reference exits on SIGINT and SIGHUP)."""
    from agent.lifecycle import stop_signals

    with stop_signals() as stop:
        sdnotify.ready()  # callers await this once their socket serves
        try:
            await stop.wait()
        finally:
            sdnotify.stopping()
