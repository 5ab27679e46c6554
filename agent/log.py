"""structlog configuration. Edge (stderr). Called only by the entry points (CLI, drop-ins).

JSON lines when stderr is not a TTY (journald, files), console rendering on a TTY. When stderr is the systemd
journal (`JOURNAL_STREAM` names it), every line starts with its syslog priority (`<3>` error ... `<7>` debug),
which journald strips and records, so `journalctl -p warning` works.

Redaction is structural, not a list of key names:
- exceptions (`log.exception`, `exc_info=`) are rendered by `agent.secret.describe_exception` only: type, a
  message only for classes whose text is caller-safe, and `file:line:function` positions; never frame locals,
  arguments or the text of a builtin exception. No traceback renderer of structlog, rich or the stdlib runs;
- every value is rendered by type: `bytes` and `Secret` become their length, exceptions their description,
  objects other than plain data their type name, long strings are cut;
- records of the stdlib `logging` module (asyncio, grpc) and uncaught exceptions of the process go through the
  same rules.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import PurePath
from types import TracebackType
from typing import Any, TextIO

import structlog

from agent.secret import Secret, clip, describe_exception, stack_positions

__all__ = ["REDACTED_KEYS", "configure", "crash_summary", "log_crash", "redact", "safe_exceptions", "safe_values"]

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
"""Keys whose values are replaced whatever their type: a second line of defence behind `safe_values`."""
MAX_VALUE_CHARS = 1024
_MAX_DEPTH = 4
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PLAIN = (str, int, float, bool, type(None))
_STRUCTLOG_KEYS = frozenset({"event", "level", "timestamp", "logger"})


def redact(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in REDACTED_KEYS & event.keys():
        event[key] = "<redacted>"
    return event


def _exception_of(value: object) -> BaseException | None:
    if isinstance(value, BaseException):
        return value
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value[1]
    if value is True:
        return sys.exc_info()[1]
    return None


def safe_exceptions(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace `exc_info`/`stack_info` by `describe_exception` fields; no renderer ever sees a traceback."""
    exc = _exception_of(event.pop("exc_info", None))
    event.pop("stack_info", None)
    event.pop("exception", None)
    if exc is not None:
        for key, value in describe_exception(exc).items():
            event.setdefault(key, value)
    return event


def _safe(value: object, depth: int) -> object:
    if isinstance(value, str):
        return clip(value, MAX_VALUE_CHARS)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Secret):
        return "<secret>"
    if isinstance(value, BaseException):
        return describe_exception(value)
    if isinstance(value, PurePath):
        return clip(str(value), MAX_VALUE_CHARS)
    if depth >= _MAX_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, Mapping):
        return {str(k): _safe(v, depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, list | tuple | set | frozenset):
        return [_safe(v, depth + 1) for v in list(value)[:64]]
    return f"<{type(value).__name__}>"  # an object's repr may hold anything


def safe_values(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Render every value by its type (see the module docstring)."""
    for key in list(event):
        if key not in _STRUCTLOG_KEYS:
            event[key] = _safe(event[key], 0)
    event["event"] = clip(str(event.get("event", "")), MAX_VALUE_CHARS)
    return event


class _StdlibBridge(logging.Handler):
    """Sends records of the stdlib `logging` module through structlog and the same redaction."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                fields["exc_info"] = exc  # the message of such records quotes the exception: not shown
            else:
                fields["message"] = record.getMessage()
            structlog.get_logger(record.name).log(record.levelno, "stdlib.log", **fields)
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - stdlib name
        pass  # the default prints a traceback with the record's arguments


_PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def crash_summary(exc: BaseException) -> str:
    """`Type at file:line in function <- ...` (innermost first, at most 5 frames): where a bug happened, with no
    message, argument or local value, so it can never carry a secret."""
    positions = [p for p in stack_positions(exc.__traceback__) if p != "…"][-5:]
    where = " <- ".join(
        f"{path.rsplit('/', 1)[-1]}:{line} in {name}"
        for path, line, name in (p.rsplit(":", 2) for p in reversed(positions))
    )
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


def log_crash(event: str, exc: BaseException, **fields: object) -> None:
    """One error line for an exception nobody expected (no traceback, no values)."""
    structlog.get_logger("agent").error(event, exc_info=exc, **fields)


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    log_crash("process.crash", exc.with_traceback(tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        log_crash("thread.crash", args.exc_value, thread=args.thread.name if args.thread else "")


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog, the stdlib bridge and the uncaught-exception hooks for the whole process."""
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
            safe_exceptions,
            redact,
            safe_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
