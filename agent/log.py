"""structlog configuration. Edge (stderr). Called only by the CLI.

JSON lines when stderr is not a TTY (journald, files), console rendering on a TTY. A redaction processor
replaces the values of keys that could carry secrets, whatever a caller passes. When stderr is the systemd
journal (`JOURNAL_STREAM` names it), every line starts with its syslog priority (`<3>` error ... `<7>` debug),
which journald strips and records, so `journalctl -p warning` works.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["REDACTED_KEYS", "configure", "crash_summary", "redact"]

REDACTED_KEYS = frozenset(
    {
        "token",
        "tee_keypair",
        "private_key",
        "key",
        "kek",
        "plaintext",
        "resource",
        "secret",
        "optsdata",
        "jwe",
    }
)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def redact(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in REDACTED_KEYS & event.keys():
        event[key] = "<redacted>"
    return event


_PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def crash_summary(exc: BaseException) -> str:
    """`Type at file:line in function <- ...` (innermost first, at most 5 frames): where a bug happened, with no
    message, argument or local value, so it can never carry a secret."""
    frames = traceback.extract_tb(exc.__traceback__)[-5:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where}" if where else type(exc).__name__


def _is_journal(out: TextIO) -> bool:
    """Whether `out` is the journal stream systemd connected us to (`JOURNAL_STREAM=<dev>:<inode>`)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class _JournalPriority:
    """Prefix a rendered line with its syslog priority for journald."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: object, method: str, event: MutableMapping[str, Any]) -> str:
        priority = _PRIORITIES.get(str(event.get("level", method)), 6)
        return f"<{priority}>{self._renderer(logger, method, event)}"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process."""
    out = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    if _is_journal(out):
        renderer = _JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.dict_tracebacks if not console else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
