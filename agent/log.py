"""Logging: the agent's loggers and the structlog configuration. Edge (stderr). Configured only by the entry
points (CLI, drop-ins).

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

Every module logs through `get_logger(name)`, whose lines go through structlog and the processors below. The
daemons configure logging with `defer=True`, so that structlog (~20 ms of imports, ~2 MiB) is not loaded before
they answer (Kata waits for the socket): a line below the configured level is dropped there and then, as
structlog's filtering logger would; any other line is kept, with its time and request context, until `release()`
loads structlog and writes the kept lines in order through the same processors. `release()` runs
`DEFER_S` after the first deferred `configure` (a timer thread, so a blocked event loop cannot hold lines back), at
exit, at the first line of level error or above, and wherever an entry point is about to print to stderr. A
process that logs nothing at its level never loads structlog.
"""

from __future__ import annotations

import atexit
import contextvars
import enum
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Any, TextIO

from agent.secret import Secret, clip, describe_exception, stack_positions

__all__ = [
    "DEFER_S",
    "REDACTED_KEYS",
    "Logger",
    "bind_request",
    "clear_request",
    "configure",
    "crash_summary",
    "get_logger",
    "is_configured",
    "log_crash",
    "redact",
    "release",
    "safe_exceptions",
    "safe_values",
]

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
    pathlib = sys.modules.get("pathlib")  # a path object exists only once pathlib was imported
    if pathlib is not None and isinstance(value, pathlib.PurePath):
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
            get_logger(record.name).log(record.levelno, "stdlib.log", **fields)
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
    get_logger("agent").error(event, exc_info=exc, **fields)


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    log_crash("process.crash", exc.with_traceback(tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        log_crash("thread.crash", args.exc_value, thread=args.thread.name if args.thread else "")


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None, *, defer: bool = False) -> None:
    """Set up structlog, the stdlib bridge and the uncaught-exception hooks for the whole process.

    `defer`: load structlog only when a line must be written, and keep lines until `release()` (module docstring).
    A later call changes the level, format and stream; lines kept so far were filtered with the level of their time.
    """
    out = stream if stream is not None else sys.stderr
    state = _STATE
    with _LOCK:
        held = state.held if state.mode == "buffer" and not defer else []
        if defer and state.mode != "buffer":
            state.held = []
            atexit.register(release)
            timer = threading.Timer(DEFER_S, release)
            timer.daemon = True
            timer.start()
        if not defer:
            state.held = []
        state.mode = "buffer" if defer else "direct"
        state.level, state.fmt, state.stream, state.configured = _LEVELS[level], fmt, out, False
        if not defer:
            _configure_structlog(state)
            _replay(held)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def is_configured() -> bool:
    """Whether `configure` ran (deferred or not), or structlog was configured by someone else."""
    if _STATE.mode != "unset":
        return True
    structlog = sys.modules.get("structlog")
    return structlog is not None and bool(structlog.is_configured())


def release() -> None:
    """Load structlog if lines are kept, write them in order, and from now on write lines as they come."""
    state = _STATE
    with _LOCK:
        if state.mode != "buffer":
            return
        held, state.held, state.mode = state.held, [], "live"
        if held:
            _configure_structlog(state)
            state.mode = "direct"
            _replay(held)


def bind_request(**fields: object) -> None:
    """The fields every line of the current request carries (`rpc`, `request_id`, `transport`), as
    structlog's `merge_contextvars` adds them: after the line's own fields, which win."""
    _REQUEST.set(fields)


def clear_request() -> None:
    _REQUEST.set(None)


def get_logger(name: str) -> Logger:
    return Logger(name)


class Logger:
    """A module's logger: structlog's level methods, each line through the configured processors."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, event: str, **fields: Any) -> None:
        _emit(self.name, "debug", logging.DEBUG, (event,), fields)

    def info(self, event: str, **fields: Any) -> None:
        _emit(self.name, "info", logging.INFO, (event,), fields)

    def warning(self, event: str, **fields: Any) -> None:
        _emit(self.name, "warning", logging.WARNING, (event,), fields)

    def error(self, event: str, **fields: Any) -> None:
        _emit(self.name, "error", logging.ERROR, (event,), fields)

    def exception(self, event: str, **fields: Any) -> None:
        _emit(self.name, "exception", logging.ERROR, (event,), fields)

    def critical(self, event: str, **fields: Any) -> None:
        _emit(self.name, "critical", logging.CRITICAL, (event,), fields)

    def log(self, level: int, event: str, **fields: Any) -> None:
        _emit(self.name, "log", level, (level, event), fields)


DEFER_S = 0.5
"""A deferred configuration writes its kept lines at the latest this long after it was made."""

_REQUEST: contextvars.ContextVar[Mapping[str, object] | None] = contextvars.ContextVar(
    "agent_log_request", default=None
)
_REPLAYED_AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("agent_log_replayed_at", default=None)
_LOCK = threading.RLock()


class _Held:
    """A line kept by a deferred configuration: the call, its request context and its time."""

    __slots__ = ("args", "at", "fields", "method", "name", "request")

    def __init__(
        self,
        name: str,
        method: str,
        args: tuple[Any, ...],
        fields: dict[str, Any],
        request: Mapping[str, object] | None,
    ) -> None:
        self.name, self.method, self.args, self.fields, self.request = name, method, args, fields, request
        self.at = time.time()


class _State:
    """`unset`: nobody configured logging (structlog's defaults apply); `direct`: configured, structlog loaded;
    `buffer`: deferred, lines kept; `live`: deferred and released, structlog not loaded yet: the first line written
    loads it and makes the state `direct`."""

    __slots__ = ("configured", "fmt", "held", "level", "mode", "stream")

    def __init__(self) -> None:
        self.mode = "unset"
        self.level = logging.NOTSET
        self.fmt = "auto"
        self.stream: TextIO | None = None
        self.held: list[_Held] = []
        self.configured = False


_STATE = _State()


def _emit(name: str, method: str, level: int, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    state = _STATE
    if state.mode in ("unset", "direct"):
        _call(name, method, args, fields)
        return
    if level < state.level:
        return  # what structlog's filtering logger does with it
    with _LOCK:
        if state.mode == "buffer" and level < logging.ERROR:
            if method == "exception":
                fields.setdefault("exc_info", True)
            if fields.get("exc_info") is True:  # the exception being handled now, not at release
                fields["exc_info"] = sys.exc_info()[1]
            state.held.append(_Held(name, method, args, fields, _REQUEST.get()))
            return
        release()
        if not state.configured:
            _configure_structlog(state)
        state.mode = "direct"  # from now on lines go straight to structlog, without this lock
        _call(name, method, args, fields)


def _call(name: str, method: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    import structlog

    getattr(structlog.get_logger(name), method)(*args, **fields)


def _replay(held: list[_Held]) -> None:
    """Write kept lines with their request context and time; they passed the level filter of their time."""
    if not held:
        return
    import structlog

    everything = structlog.make_filtering_bound_logger(logging.NOTSET)
    for line in held:
        request, at = _REQUEST.set(line.request), _REPLAYED_AT.set(line.at)
        try:
            logger = structlog.wrap_logger(None, wrapper_class=everything, logger_factory_args=(line.name,))
            getattr(logger, line.method)(*line.args, **line.fields)
        finally:
            _REQUEST.reset(request)
            _REPLAYED_AT.reset(at)


def _merge_request(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in (_REQUEST.get() or {}).items():
        event.setdefault(key, value)
    return event


def _replayed_time(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A kept line shows the time it was logged, in TimeStamper's format (the line before stamped it now)."""
    at = _REPLAYED_AT.get()
    if at is not None and "timestamp" in event:
        import datetime

        stamp = datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat()
        event["timestamp"] = stamp.replace("+00:00", "Z")
    return event


def _configure_structlog(state: _State) -> None:
    import structlog

    out = state.stream if state.stream is not None else sys.stderr
    console = state.fmt == "console" or (state.fmt == "auto" and out.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    if _is_journal(out):
        renderer = _JournalPriority(renderer)
    structlog.configure(
        processors=[
            _merge_request,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _replayed_time,
            safe_exceptions,
            redact,
            safe_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(state.level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    state.configured = True
