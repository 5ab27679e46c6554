"""ttRPC on asyncio Unix sockets: `TtrpcServer` and `TtrpcClient`. Edge.

This is the transport the in-guest callers of the reference guest components speak (kata-agent's children,
the data hub, image-rs/ocicrypt-rs, api-server-rest). Only unary calls exist; the wire format lives in
`agent.api.ttrpc_frame`.

Server behaviour follows containerd/ttrpc-rust's asynchronous server (the one the reference agent uses)
and, where that server has no rule, containerd/ttrpc (Go). The connection stays open in every case but the
last two:

    input from a client                    answer
    -------------------------------------  -----------------------------------------------------------
    request that does not decode           INVALID_ARGUMENT "request does not decode as ttrpc.Request"
    unknown service                        INVALID_ARGUMENT "<service> service does not exist" (name cut
                                           to 200 characters, as every quote of caller input)
    known service, unknown method          UNIMPLEMENTED "<method> method"
    declared but not implemented           NOT_FOUND "/<service>/<method> is not supported"
    handler raises RpcError                its code and message
    handler raises anything else           UNKNOWN "internal error" (the exception goes to on_error)
    timeout_nano > 0 exceeded              DEADLINE_EXCEEDED "timeout" (the handler is cancelled)
    response larger than 4 MiB             INVALID_ARGUMENT "message length N exceed maximum message size of
                                           4194304" (one line)
    header announcing more than 4 MiB      the same, on that header's stream id; its data is skipped unbuffered
    even stream id (any type)              INVALID_ARGUMENT "stream id must be odd"
    request id not above the previous one  INVALID_ARGUMENT "StreamID cannot be re-used and must increment"
    Data frame (no streams are served)     INVALID_ARGUMENT "Stream is no longer active"
    Response frame, unknown message type   ignored
    end of input inside a frame            connection closed, requests in flight cancelled
    end of input, socket error             connection closed, requests in flight cancelled

Bounds against hostile local clients (the reference has none of these; no well-behaved caller meets them):

    a frame not complete 10 s after its    connection closed (slowloris)
    first byte
    a reply not taken by the peer within   connection closed, requests in flight cancelled (a peer that
    10 s (`write_timeout_s`)               sends and never reads)
    replies waiting to be written          no further request is read or dispatched until they are
                                           (back-pressure), and at most `max_in_flight` run at once
    requests at work on all connections    at most `max_handlers` (16), of which at most 4 for methods
                                           that have made a reply over 64 KiB (heavy, `HandlerSlots`);
                                           a further request waits in its connection's in-flight slot
    a reply over 64 KiB                    charged to the process's reply budget (`agent.api.budget`,
                                           32 MiB by default) until the peer has taken it or is dropped;
                                           replies are written one at a time per connection; a reply
                                           the budget refuses (after waiting up to 10 s, if waiting is
                                           allowed) is answered RESOURCE_EXHAUSTED "reply is N bytes and
                                           the B-byte reply budget is held by replies waiting for their
                                           readers; try again"; a call of a method that has made a
                                           large reply reserves that size before its handler runs
                                           (waiting up to 10 s) and is refused so, with no work done
    `max_connections` connections open     a new one waits (unread) up to 10 s for a slot; a connection
                                           whose peer has made no progress for `evict_idle_after_s` (0.5 s:
                                           idle, a partial frame that stopped, a reply it does not read;
                                           never one whose handlers are running) is closed to make room;
                                           beyond `max_connections` waiting ones, new connections are closed

So a hostile connection holds at most one partial frame (≤ 4 MiB), `max_in_flight` requests and its
replies, for at most 10 s while it is not served; the replies of all connections together (over 64 KiB
each) stay within the reply budget and a quarter more waiting for it, and stalled connections shut nobody
out for more than a second. Replies up to 64 KiB are not charged, so a full budget never refuses them.

Example:

    server = TtrpcServer({"attestation_agent.AttestationAgentService": {"GetTeeType": get_tee_type}})
    await server.start("/run/confidential-containers/attestation-agent/attestation-agent.sock")
    ...
    async with TtrpcClient(path) as client:
        reply = await client.call("attestation_agent.AttestationAgentService", "GetTeeType", b"", timeout=5.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from agent.api.budget import Charge, HandlerSlots, ReplyBudget, Slot
from agent.api.sockets import prepare_socket_path
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc_frame import (
    MAX_DATA,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    FrameHeader,
    FrameTooLargeError,
    MalformedMessageError,
    MessageType,
    RpcRequest,
    RpcResponse,
    UnknownFrameTypeError,
    encode_frame,
)

__all__ = [
    "REPLY_ADMISSION",
    "REQUEST_DEADLINE",
    "CallHook",
    "ErrorHook",
    "EventHook",
    "TtrpcClient",
    "TtrpcServer",
    "UNKNOWN_ERROR_MESSAGE",
    "UnaryHandler",
]

UnaryHandler = Callable[[bytes], Awaitable[bytes]]
"""Takes the inner request payload, returns the inner response payload; raises `RpcError` for a status."""

CallHook = Callable[[str, str, StatusCode, float], None]
"""`on_call(service, method, code, duration_s)`, once per request that was dispatched (odd, increasing stream
id); `code` is what was sent, CANCELLED if the request was cancelled; names are "" if it did not decode."""

ErrorHook = Callable[[str, str, Exception], None]
"""`on_error(service, method, exc)` for a handler exception that is answered with UNKNOWN."""

EventHook = Callable[[str, Mapping[str, object]], None]
"""`on_event(event, fields)` for connection-level events (refused connection, protocol violations) and replies
the reply budget refused (`ttrpc.reply.refused`; for a call refused before its handler ran, with its `rpc`,
`duration_s` and the `error` it was answered)."""

UNKNOWN_ERROR_MESSAGE: Final = "internal error"
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("ttrpc_deadline", default=None)
"""The `time.monotonic()` deadline of the request a handler is serving (None: the caller set none)."""
REPLY_ADMISSION: contextvars.ContextVar[Callable[[int], Awaitable[None]] | None] = contextvars.ContextVar(
    "ttrpc_reply_admission", default=None
)
"""For the handler serving a request: `admit(payload_size)` charges its OK reply to the reply budget before the
handler returns, or raises `ReplyRefused` (the answer it is then to give), so that the handler can log what the
caller gets. A handler that does not call it has its reply charged when it is written, and a refused one
replaced by RESOURCE_EXHAUSTED. The request's deadline stops once it is called: it bounds the handler's work."""
_READ_CHUNK: Final = 64 * 1024
_LISTEN_BACKLOG: Final = 64
_QUOTE_LIMIT: Final = 200
_WRITE_HIGH_WATER: Final = 64 * 1024
_SLOT_POLL_S: Final = 0.1
_FRAMING: Final = 32
"""More than a `ttrpc.Response`'s bytes around its payload and message (status, tags, lengths)."""


def _quoted(name: str) -> str:
    return name if len(name) <= _QUOTE_LIMIT else f"{name[:_QUOTE_LIMIT]}…"


class _State(enum.Enum):
    NEW = "new"
    SERVING = "serving"
    CLOSING = "closing"
    CLOSED = "closed"


def _oversize_message(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MAX_DATA}"


class TtrpcServer:
    """A ttRPC server for unary calls on one Unix socket.

    Args:
        handlers: service name (fully qualified, e.g. `attestation_agent.AttestationAgentService`) → method
            name → handler.
        declared_but_unimplemented: service → methods that exist in the proto but are not served; they are
            answered with NOT_FOUND as the reference's generated default does.
        max_connections: connections served at once; a further one waits for a slot (see the module
            docstring), evicting the connection idle longest once it has been idle `evict_idle_after_s`.
        max_in_flight: requests handled at once per connection; past that the server stops reading from
            that connection until one finishes (back-pressure, no error).
        max_handlers: requests handled at once on all connections; a connection's next request waits
            (unread) for one to finish.
        reply_budget: the byte budget replies are charged to until the peer has taken them (shared with
            other servers if given; a `ReplyBudget()` of this server's own otherwise).
        write_timeout_s: how long a reply may wait for the peer to read it before the connection is closed;
            also the time a frame may take to arrive once its first byte has.
        evict_idle_after_s: how long a connection must have been idle before it may be closed for a new one.
        accept_wait_s: how long a new connection waits for a slot before it is closed.
        on_call, on_error, on_event: optional hooks (see `CallHook`, `ErrorHook`, `EventHook`). They must
            not block; an exception they raise is suppressed.

    Raises:
        ValueError: a limit is below 1, or a method is both implemented and declared unimplemented.
    """

    def __init__(
        self,
        handlers: Mapping[str, Mapping[str, UnaryHandler]],
        *,
        declared_but_unimplemented: Mapping[str, Iterable[str]] | None = None,
        max_connections: int = 64,
        max_in_flight: int = 4,
        max_handlers: int = 16,
        reply_budget: ReplyBudget | None = None,
        write_timeout_s: float = 10.0,
        evict_idle_after_s: float = 0.5,
        accept_wait_s: float = 10.0,
        on_call: CallHook | None = None,
        on_error: ErrorHook | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        if max_connections < 1:
            msg = f"`max_connections` is {max_connections}, expected at least 1"
            raise ValueError(msg)
        for name, limit in (("max_in_flight", max_in_flight), ("max_handlers", max_handlers)):
            if limit < 1:
                msg = f"`{name}` is {limit}, expected at least 1"
                raise ValueError(msg)
        self._handlers = {service: dict(methods) for service, methods in handlers.items()}
        self._declared = {
            service: frozenset(methods) for service, methods in (declared_but_unimplemented or {}).items()
        }
        for service, methods in self._declared.items():
            both = sorted(methods & self._handlers.get(service, {}).keys())
            if both:
                msg = f"`{service}` methods {both} are both implemented and declared unimplemented"
                raise ValueError(msg)
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_handlers = max_handlers
        self.reply_budget = reply_budget if reply_budget is not None else ReplyBudget()
        self._handler_slots = HandlerSlots(max_handlers)
        self.write_timeout_s = write_timeout_s
        self.evict_idle_after_s = evict_idle_after_s
        self.accept_wait_s = accept_wait_s
        self._waiting = 0
        self._on_call = on_call
        self._on_error = on_error
        self._on_event = on_event
        self._state = _State.NEW
        self._listener: asyncio.Server | None = None
        self._path: str | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[_ServerConnection] = set()
        self._closed = asyncio.Event()

    @property
    def path(self) -> str | None:
        """The socket path once started."""
        return self._path

    @property
    def serving(self) -> bool:
        """True between `start()` and `close()`."""
        return self._state is _State.SERVING

    @property
    def connection_count(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    async def start(self, path: str, mode: int = 0o600) -> None:
        """Bind and listen on `path`.

        Creates the parent directory with mode 0o700 if it is missing, removes a stale socket file at
        `path`, and gives the socket `mode` (set before bind too, so the umask's mode never shows).

        Raises:
            RuntimeError: the server was already started.
            ConfigError: `path` exists and is not a socket (it is never removed), or another process listens there.
            OSError: the directory or socket cannot be created.
        """
        if self._state is not _State.NEW:
            msg = f"Cannot start a ttRPC server that is {self._state.value}."
            raise RuntimeError(msg)
        sock, inode = _bind_unix_socket(path, mode)
        try:
            self._listener = await asyncio.start_unix_server(self._accept, sock=sock, limit=_READ_CHUNK)
        except BaseException:
            sock.close()
            raise
        self._path = path
        self._inode = inode
        self._state = _State.SERVING

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish for up to `grace_s` seconds, then close everything.

        Requests still running after the grace period are cancelled and get no answer. Reading from
        connections stops at once, so requests sent after `close()` started are not served. The socket file
        is removed if it is still the one this server created. Calling it again waits for the first call.
        """
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            self._closed.set()
            return
        if self._state is not _State.SERVING:
            await self._closed.wait()
            return
        self._state = _State.CLOSING
        try:
            if self._listener is not None:
                self._listener.close()
            connections = list(self._connections)
            for conn in connections:
                conn.stop_reading()
            in_flight = [task for conn in connections for task in conn.handler_tasks()]
            if in_flight:
                await asyncio.wait(in_flight, timeout=grace_s)
            await asyncio.gather(*(conn.shutdown() for conn in connections))
            if self._listener is not None:
                await self._listener.wait_closed()
            self._remove_socket_file()
        finally:
            self._state = _State.CLOSED
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once `close()` has completed."""
        await self._closed.wait()

    def _remove_socket_file(self) -> None:
        if self._path is None or self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self._path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._inode:
                Path(self._path).unlink()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await self._slot():
            self._event("ttrpc.connection.refused", connections=len(self._connections), waiting=self._waiting)
            writer.transport.abort()
            return
        conn = _ServerConnection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def _slot(self) -> bool:
        """Wait for room for one more connection; False if there is none within `accept_wait_s`."""
        if self._state is not _State.SERVING:
            return False
        if len(self._connections) < self.max_connections:
            return True
        if self._waiting >= self.max_connections:
            return False
        self._waiting += 1
        try:
            deadline = time.monotonic() + self.accept_wait_s
            while self.serving:
                if len(self._connections) < self.max_connections:
                    return True
                idle = [c for c in self._connections if c.idle_since is not None]
                if idle:
                    oldest = min(idle, key=lambda c: c.idle_since or 0.0)
                    if time.monotonic() - (oldest.idle_since or 0.0) >= self.evict_idle_after_s:
                        self._event("ttrpc.connection.evicted", connections=len(self._connections))
                        self._connections.discard(oldest)
                        oldest.evict()
                        return True
                if time.monotonic() >= deadline:
                    return False
                await asyncio.sleep(_SLOT_POLL_S)
            return False
        finally:
            self._waiting -= 1

    async def invoke(self, request: RpcRequest, call: _Call | None = None) -> RpcResponse:
        """Route one decoded request to its handler and build the response (no framing); `call` is the
        request's hold on the reply budget, offered to the handler as `REPLY_ADMISSION`."""
        handler = self._route(request.service, request.method)
        if isinstance(handler, RpcResponse):
            return handler
        seconds = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        deadline = asyncio.timeout(seconds)
        REQUEST_DEADLINE.set(time.monotonic() + seconds if seconds is not None else None)
        if call is not None:
            call.deadline = deadline
        REPLY_ADMISSION.set(call.admit if call is not None else None)
        try:
            async with deadline:
                payload = await handler(request.payload)
        except RpcError as exc:
            return _status(exc.code, exc.message)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                return _status(StatusCode.DEADLINE_EXCEEDED, "timeout")
            # Never the exception text: it may carry secrets. The hook gets the exception for the log.
            self._report_error(request.service, request.method, exc)
            return _status(StatusCode.UNKNOWN, UNKNOWN_ERROR_MESSAGE)
        return RpcResponse(code=StatusCode.OK, payload=payload)

    def _route(self, service: str, method: str) -> UnaryHandler | RpcResponse:
        methods = self._handlers.get(service)
        declared = self._declared.get(service)
        if methods is None and declared is None:
            return _status(StatusCode.INVALID_ARGUMENT, f"{_quoted(service)} service does not exist")
        handler = methods.get(method) if methods is not None else None
        if handler is not None:
            return handler
        if declared is not None and method in declared:
            return _status(StatusCode.NOT_FOUND, f"/{service}/{method} is not supported")
        return _status(StatusCode.UNIMPLEMENTED, f"{_quoted(method)} method")

    def _report_error(self, service: str, method: str, exc: Exception) -> None:
        if self._on_error is not None:
            with contextlib.suppress(Exception):
                self._on_error(service, method, exc)

    def _report_call(self, service: str, method: str, code: StatusCode, duration_s: float) -> None:
        if self._on_call is not None:
            with contextlib.suppress(Exception):
                self._on_call(service, method, code, duration_s)

    def _event(self, name: str, **fields: object) -> None:
        if self._on_event is not None:
            with contextlib.suppress(Exception):
                self._on_event(name, fields)


def _status(code: StatusCode, message: str) -> RpcResponse:
    return RpcResponse(code=code, message=message)


def _reply_bound(payload_size: int, message: str = "") -> int:
    """At least the encoded size of a `ttrpc.Response` with this payload size and message: what is charged."""
    return payload_size + len(message) * 4 + _FRAMING


class _Call:
    """A dispatched request's hold on the server: its handler slot and reply reservation while its handler
    runs, then its reply's charge to the reply budget until the reply is written.

    `admit` (the request's `REPLY_ADMISSION`) charges the reply or refuses it; a reply its handler did not
    admit is charged by `take` when it is written. Every part is given back by `release()` (idempotent).
    """

    __slots__ = ("_budget", "_path", "_reserved", "_slot", "_slots", "charge", "deadline")

    def __init__(
        self, slots: HandlerSlots, budget: ReplyBudget, path: str, slot: Slot, reserved: Charge | None
    ) -> None:
        self._slots = slots
        self._budget = budget
        self._path = path  # "" for a method that is not served: never recorded as heavy
        self._slot: Slot | None = slot
        self._reserved = reserved
        self.deadline: asyncio.Timeout | None = None
        self.charge: Charge | None = None
        """The admitted reply's charge, until the connection takes it over to write the reply."""

    def handled(self, payload_size: int) -> None:
        """The handler is done with a reply of `payload_size` bytes: free its slot, record the size."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()  # what follows waits for the budget and the peer, not for the agent
            if self._path:
                self._slots.made(self._path, payload_size)

    async def admit(self, payload_size: int) -> None:
        """Charge the handler's OK reply of `payload_size` bytes; raises `ReplyRefused` if the budget refuses it."""
        if self.charge is not None:
            msg = "Cannot admit a second reply for one request."
            raise RuntimeError(msg)
        if self.deadline is not None and not self.deadline.expired():
            self.deadline.reschedule(None)  # the handler's work is done; the wait for budget has its own bound
        self.handled(payload_size)
        size = _reply_bound(payload_size)
        charge = await self.take(size)
        if charge is None:
            raise self._budget.refusal(size)
        self.charge = charge

    async def take(self, size: int) -> Charge | None:
        """Charge a reply of `size` bytes, using the reservation (see `ReplyBudget.charge_reply`); None if refused."""
        reserved, self._reserved = self._reserved, None
        return await self._budget.charge_reply(size, reserved)

    def release(self) -> None:
        slot, self._slot = self._slot, None
        reserved, self._reserved = self._reserved, None
        charge, self.charge = self.charge, None
        for held in (slot, reserved, charge):
            if held is not None:
                held.release()


def _code_of(raw: int) -> StatusCode:
    try:
        return StatusCode(raw)
    except ValueError:
        return StatusCode.UNKNOWN


def _bind_unix_socket(path: str, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    """Bind a listening socket at `path`; returns it with the socket file's (st_dev, st_ino)."""
    prepare_socket_path(path)  # the same stale-socket rules as the gRPC server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the socket file the mode of the unbound socket's inode (masked by the umask), so
        # setting it before bind leaves no window in which the file has looser permissions.
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        Path(path).chmod(mode)
        st = Path(path).stat()
        sock.listen(_LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


class _ServerConnection:
    """One accepted connection: a reader loop plus one task per request in flight."""

    def __init__(self, server: TtrpcServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._slots = asyncio.Semaphore(server.max_in_flight)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._write_lock = asyncio.Lock()  # one reply written (and waited for) at a time
        self._last_stream_id = 0
        self._reader_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._reading = True
        self._shutdown_started = False
        self._shutdown_done = asyncio.Event()
        self._at_boundary = True
        self._last_activity = time.monotonic()

    def handler_tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks.values())

    @property
    def idle_since(self) -> float | None:
        """Since when the peer has made no progress, if the server waits for nothing but the peer.

        None while a handler runs for it. Otherwise the last time bytes arrived or a reply was taken: an
        idle connection, a partial frame that stopped arriving, a reply the peer does not read.
        """
        if self._stopping:
            return None
        if self._tasks and not self._writer.transport.get_write_buffer_size():
            return None  # handlers at work: the wait is the agent's, not the peer's
        return self._last_activity

    def evict(self) -> None:
        """Close an idle connection to make room for a new one (its peer sees the end of the stream)."""
        self._writer.transport.abort()

    def stop_reading(self) -> None:
        """Stop reading frames; in-flight requests keep running until `shutdown()`."""
        self._stopping = True
        if self._reading and self._reader_task is not None:
            self._reader_task.cancel()

    async def run(self) -> None:
        """Serve the connection until the peer leaves, the stream breaks, or the server shuts it down."""
        task = self._reader_task = asyncio.current_task()
        try:
            try:
                await self._read_loop()
            except asyncio.CancelledError:
                if not self._stopping or task is None:
                    raise
                task.uncancel()  # the server's close() stopped the reading; it drives the rest
            except (ConnectionError, OSError) as exc:
                self._server._event("ttrpc.connection.error", error=type(exc).__name__)
            finally:
                self._reading = False
            if self._stopping:
                # Stay alive until close() has finished with this connection: on Python 3.12+ the stream
                # server closes the transport as soon as this task ends cancelled.
                await self._shutdown_done.wait()
        finally:
            if not self._stopping:
                await self.shutdown()

    async def shutdown(self) -> None:
        """Cancel what is still running and close the socket; concurrent callers wait for the first."""
        if self._shutdown_started:
            await self._shutdown_done.wait()
            return
        self._shutdown_started = True
        try:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        finally:
            self._shutdown_done.set()

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        frame_started: float | None = None
        while True:
            await self._writable()  # back-pressure: no more requests while replies wait for the peer
            if frame_started is None:
                data = await self._reader.read(_READ_CHUNK)
            else:
                left = frame_started + self._server.write_timeout_s - time.monotonic()
                try:
                    async with asyncio.timeout(max(left, 0.0)):
                        data = await self._reader.read(_READ_CHUNK)
                except TimeoutError:
                    self._server._event("ttrpc.frame.timeout", buffered=decoder.buffered)
                    return
            if not data:
                if not decoder.at_boundary:
                    self._server._event("ttrpc.frame.truncated", buffered=decoder.buffered)
                return
            self._last_activity = time.monotonic()
            decoder.feed(data)
            completed = False
            while True:
                try:
                    frame = decoder.next_frame()
                except FrameTooLargeError as exc:
                    header = exc.header
                    self._server._event("ttrpc.frame.oversized", stream_id=header.stream_id, length=header.length)
                    await self._send_response(
                        header.stream_id,
                        _status(StatusCode.INVALID_ARGUMENT, _oversize_message(header.length)),
                    )
                    continue
                except UnknownFrameTypeError as exc:
                    self._server._event(
                        "ttrpc.frame.ignored", stream_id=exc.header.stream_id, msg_type=exc.header.msg_type
                    )
                    completed = True
                    continue
                if frame is None:
                    break
                completed = True
                await self._dispatch(frame)
            self._at_boundary = decoder.at_boundary
            if self._at_boundary:
                frame_started = None
            elif completed or frame_started is None:
                frame_started = time.monotonic()

    async def _writable(self) -> None:
        """Before reading or dispatching: return once the replies not yet taken by the peer are below the
        high-water mark."""
        await self._taken()

    async def _taken(self) -> None:
        """Return once the replies not yet taken by the peer are below the high-water mark."""
        if self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await self._drain()

    async def _drain(self) -> None:
        """Wait for the peer to take what was written; close the connection if it does not in time."""
        try:
            async with asyncio.timeout(self._server.write_timeout_s):
                await self._writer.drain()
        except TimeoutError:
            self._server._event(
                "ttrpc.connection.write_timeout", unwritten=self._writer.transport.get_write_buffer_size()
            )
            self._writer.transport.abort()
            raise ConnectionResetError from None
        self._last_activity = time.monotonic()

    async def _dispatch(self, frame: Frame) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 != 1:
            await self._reject(stream_id, "stream id must be odd")
            return
        if frame.msg_type is MessageType.DATA:
            await self._reject(stream_id, "Stream is no longer active")
            return
        if frame.msg_type is not MessageType.REQUEST:
            self._server._event("ttrpc.frame.ignored", stream_id=stream_id, msg_type=int(frame.msg_type))
            return
        if stream_id <= self._last_stream_id:
            await self._reject(stream_id, "StreamID cannot be re-used and must increment")
            return
        self._last_stream_id = stream_id
        request: RpcRequest | MalformedMessageError
        try:
            request = RpcRequest.from_bytes(frame.data)
        except MalformedMessageError as exc:
            request = exc
        await self._writable()
        await self._slots.acquire()
        task = asyncio.create_task(self._serve(stream_id, request))
        self._tasks[stream_id] = task
        task.add_done_callback(lambda _: self._finished(stream_id))

    def _finished(self, stream_id: int) -> None:
        self._tasks.pop(stream_id, None)
        self._slots.release()

    async def _reject(self, stream_id: int, message: str) -> None:
        self._server._event("ttrpc.frame.rejected", stream_id=stream_id, reason=message)
        await self._send_response(stream_id, _status(StatusCode.INVALID_ARGUMENT, message))

    async def _serve(self, stream_id: int, request: RpcRequest | MalformedMessageError) -> None:
        started = time.monotonic()
        service = method = ""
        code = StatusCode.CANCELLED
        call: _Call | None = None
        try:
            if isinstance(request, MalformedMessageError):
                response = _status(StatusCode.INVALID_ARGUMENT, str(request))
            else:
                service, method = request.service, request.method
                path = f"/{service}/{method}"
                slots, budget = self._server._handler_slots, self._server.reply_budget
                served = method in self._server._handlers.get(service, {})
                # a heavy method's call reserves room for its reply before any work (see agent.api.budget)
                started_call = await slots.start(path if served else "", budget, framing=_FRAMING)
                if started_call is None:  # refused before its handler ran: no work done
                    refusal = budget.refusal(slots.reply_size(path))
                    waited_s = time.monotonic() - started
                    self._server._event(
                        "ttrpc.reply.refused",
                        stream_id=stream_id,
                        rpc=path,
                        duration_s=waited_s,
                        error=refusal,
                        **refusal.fields,
                    )
                    response = _status(refusal.code, refusal.message)
                else:
                    call = _Call(slots, budget, path if served else "", *started_call)
                    if self._writer.is_closing():
                        return  # the peer left while this call waited: no work for nobody
                    response = await self._server.invoke(request, call)
                    call.handled(len(response.payload))
                del request
            held = [response]
            del response  # `_send_response` drops it once encoded: nothing else may keep the payload alive
            code = await self._send_response(stream_id, held, call)
        finally:
            if call is not None:
                call.release()
            self._server._report_call(service, method, code, time.monotonic() - started)

    async def _send_response(
        self, stream_id: int, response: RpcResponse | list[RpcResponse], call: _Call | None = None
    ) -> StatusCode:
        """Charge `response` to the reply budget, then frame and write it; returns the status code sent.

        The charge is the one `call` (the request's, if any) admitted for it, else taken now (using what `call`
        reserved); a reply the budget refuses now is replaced by RESOURCE_EXHAUSTED. Replies are written one at
        a time, each once the peer has taken the previous one; the charge is given back when the peer has taken
        it too, or the connection is gone. Given in a one-element list, the response is taken out of it, so
        that once encoded the payload is held only by the bytes being written.
        """
        if isinstance(response, list):
            response = response.pop()
        size = _reply_bound(len(response.payload), response.message)
        budget = self._server.reply_budget
        charge: Charge | None
        if call is not None and call.charge is not None:
            charge, call.charge = call.charge, None
        else:
            charge = await (call.take(size) if call is not None else budget.charge(size))
        if charge is None:
            refusal = budget.refusal(size)
            self._server._event("ttrpc.reply.refused", stream_id=stream_id, **refusal.fields)
            response = _status(refusal.code, refusal.message)
            charge = Charge(None, 0)
        held = [response]
        del response  # `_write_response` drops it once encoded
        try:
            async with self._write_lock:
                return await self._write_response(stream_id, held)
        finally:
            charge.release()

    async def _write_response(self, stream_id: int, held: list[RpcResponse]) -> StatusCode:
        with contextlib.suppress(ConnectionError):
            # Wait for the peer before encoding: a reply waiting here holds its payload, not a second copy.
            await self._taken()
        response = held.pop()
        data = response.to_bytes()
        if len(data) > MAX_DATA:
            self._server._event("ttrpc.response.oversized", stream_id=stream_id, length=len(data))
            response = _status(StatusCode.INVALID_ARGUMENT, _oversize_message(len(data)))
            data = response.to_bytes()
        code = _code_of(response.code)
        del response  # its payload is in `data` now
        if self._writer.is_closing():
            return code
        header = FrameHeader(length=len(data), stream_id=stream_id, msg_type=MessageType.RESPONSE)
        self._writer.write(header.to_bytes())
        self._writer.write(data)  # two writes: no copy of up to 4 MiB to prepend the header
        del data
        with contextlib.suppress(ConnectionError):
            await self._drain()
        return code


class _ConnectionClosedError(Exception):
    """The client connection was found closed before a request was written to it."""


class _ClientConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future[RpcResponse]] = {}
        self._next_stream_id = 1
        self.closed = False
        self._reader_task = asyncio.create_task(self._read_loop())

    def send(self, data: bytes) -> tuple[int, asyncio.Future[RpcResponse]]:
        """Write one Request frame; raises `_ConnectionClosedError` if nothing could be written."""
        if self.closed or self._writer.is_closing() or self._next_stream_id > MAX_STREAM_ID:
            self.closed = True
            raise _ConnectionClosedError
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        future: asyncio.Future[RpcResponse] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        self._writer.write(encode_frame(stream_id, MessageType.REQUEST, data))
        return stream_id, future

    async def drain(self) -> None:
        await self._writer.drain()

    def forget(self, stream_id: int) -> None:
        self._pending.pop(stream_id, None)

    async def close(self) -> None:
        self.closed = True
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    return
                decoder.feed(data)
                while True:
                    try:
                        frame = decoder.next_frame()
                    except FrameTooLargeError as exc:
                        self._fail(exc.header.stream_id, RpcError(StatusCode.RESOURCE_EXHAUSTED, str(exc)))
                        continue
                    except UnknownFrameTypeError:
                        continue
                    if frame is None:
                        break
                    if frame.msg_type is MessageType.RESPONSE:
                        self._complete(frame)
        except (ConnectionError, OSError):
            return
        finally:
            self.closed = True
            for stream_id in list(self._pending):
                self._fail(stream_id, RpcError(StatusCode.UNAVAILABLE, "connection closed before the response"))
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    def _complete(self, frame: Frame) -> None:
        future = self._pending.pop(frame.stream_id, None)
        if future is None or future.done():
            return
        try:
            future.set_result(RpcResponse.from_bytes(frame.data))
        except MalformedMessageError as exc:
            future.set_exception(RpcError(StatusCode.INTERNAL, str(exc)))

    def _fail(self, stream_id: int, error: RpcError) -> None:
        future = self._pending.pop(stream_id, None)
        if future is not None and not future.done():
            future.set_exception(error)


class TtrpcClient:
    """A ttRPC client for unary calls over one Unix socket connection, shared by concurrent calls.

    The connection is opened on the first call. If it is found closed when a call starts (the server
    restarted), the call opens a new one, once. A call whose request was already written is never resent:
    if the connection drops before the answer, it fails with UNAVAILABLE.

    Args:
        path: the server's socket path.
        connect_timeout_s: bound on opening the connection.
    """

    def __init__(self, path: str, *, connect_timeout_s: float = 5.0) -> None:
        self._path = path
        self._connect_timeout_s = connect_timeout_s
        self._conn: _ClientConnection | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with UNAVAILABLE."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None,  # noqa: ASYNC109 - the deadline is also sent to the server as timeout_nano
        metadata: Iterable[tuple[str, str]] = (),
    ) -> bytes:
        """Send one unary request and return the inner response payload.

        `timeout` (seconds) bounds the whole call and is sent to the server as `timeout_nano`;
        None waits without limit.

        Raises:
            RpcError: the server answered a non-OK status; DEADLINE_EXCEEDED when `timeout` passed;
                UNAVAILABLE when the socket cannot be reached or the connection dropped.
            RuntimeError: the client was closed.
            ValueError: `timeout` is not positive, or the request exceeds the 4 MiB frame limit.
        """
        if self._closed:
            msg = "Cannot send a request, as the client has been closed."
            raise RuntimeError(msg)
        if timeout is not None and not timeout > 0:
            msg = f"`timeout` is {timeout}, expected a positive number of seconds or None"
            raise ValueError(msg)
        request = RpcRequest(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=round(timeout * 1e9) if timeout is not None else 0,
            metadata=tuple(metadata),
        )
        data = request.to_bytes()
        if len(data) > MAX_DATA:
            msg = f"request is {len(data):#x} bytes, expected at most {MAX_DATA:#x}"
            raise ValueError(msg)
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                response = await self._round_trip(data)
        except TimeoutError as exc:
            if deadline.expired():
                text = f"no answer to /{service}/{method} within {timeout} s"
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, text) from exc
            raise
        if response.code != StatusCode.OK:
            raise RpcError(_code_of(response.code), response.message)
        return response.payload

    async def _round_trip(self, data: bytes) -> RpcResponse:
        for _attempt in range(2):
            conn = await self._connection()
            try:
                stream_id, future = conn.send(data)
            except _ConnectionClosedError:
                continue
            try:
                try:
                    await conn.drain()
                except ConnectionError as exc:
                    raise RpcError(StatusCode.UNAVAILABLE, "connection lost while sending") from exc
                return await future
            finally:
                conn.forget(stream_id)
        raise RpcError(StatusCode.UNAVAILABLE, f"connection to {self._path} closed")

    async def _connection(self) -> _ClientConnection:
        async with self._lock:
            if self._closed:
                msg = "Cannot send a request, as the client has been closed."
                raise RuntimeError(msg)
            if self._conn is not None and not self._conn.closed:
                return self._conn
            old, self._conn = self._conn, None
            if old is not None:
                await old.close()
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    reader, writer = await asyncio.open_unix_connection(self._path, limit=_READ_CHUNK)
            except (OSError, TimeoutError) as exc:
                text = f"cannot connect to ttRPC socket {self._path}"
                raise RpcError(StatusCode.UNAVAILABLE, text) from exc
            self._conn = _ClientConnection(reader, writer)
            return self._conn
