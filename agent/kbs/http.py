"""HTTP/1.1 to one KBS: kept-alive connections over asyncio streams, messages framed and parsed by h11. Edge (network).

The KBS exchange is three request shapes to one origin (POST auth, POST attest, GET resource), so this is a small
client for exactly that: one origin, no redirects, no proxies from the environment, no cookie jar (RCAR's cookie is
sent explicitly), no compression, bodies bounded while they are read. Parsing and framing are h11's (the sans-I/O
HTTP/1.1 implementation under httpx); this module only moves bytes, pools connections and maps failures.

Pooling: at most `max_connections` at once (16: a burst of callers queues for one instead of opening one each), at
most `max_idle` kept (8), each reused only within `keepalive_s` of its last answer (4 s: shorter than the KBS's own
~5 s keep-alive, kbs-protocol.md §9) and only if the peer has not closed it meanwhile. A reused connection that
fails before the first byte of its answer (the KBS closed it as the request went out) is retried once on a new
connection; any other failure is the caller's to retry.

Time is the caller's: every await here is cancellable and a cancelled exchange closes its connection.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import h11

from agent.secret import clip

__all__ = [
    "ConnectError",
    "HttpError",
    "HttpResponse",
    "Origin",
    "Pool",
    "ReadError",
    "RemoteProtocolError",
    "ResponseTooLarge",
    "Transport",
    "WriteError",
]

_READ_CHUNK = 64 * 1024
_MAX_INFORMATIONAL = 8  # 1xx answers skipped before the real one
_MAX_QUOTE_CHARS = 200


class HttpError(Exception):
    """A failed exchange. `retryable`: the same request may succeed on a new connection; `answered`: some bytes of
    an answer had arrived (so the KBS saw the request)."""

    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None, answered: bool = False) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable
        self.answered = answered


class ConnectError(HttpError):
    """No connection (refused, unresolvable, TLS handshake failed)."""

    retryable = True


class WriteError(HttpError):
    retryable = True


class ReadError(HttpError):
    retryable = True


class RemoteProtocolError(HttpError):
    """The peer broke HTTP/1.1 (malformed or truncated answer, or closed before answering)."""

    retryable = True


class ResponseTooLarge(HttpError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the response exceeds {limit} bytes", answered=True)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the KBS is: scheme, host, port and a path prefix (`http://kbs:8080/prefix` -> `/prefix/kbs/v0/...`)."""

    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        """`ValueError` (with the reason, never the URL's userinfo) for anything but http(s)://host[:port][/path]."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            msg = f"is not a URL ({exc})"
            raise ValueError(msg) from None
        if parts.scheme not in ("http", "https"):
            msg = f"scheme is {parts.scheme!r}, expected http or https"
            raise ValueError(msg)
        if not parts.hostname:
            msg = "has no host"
            raise ValueError(msg)
        if parts.username is not None or parts.password is not None:
            msg = "carries user:password, which the KBS protocol does not use"
            raise ValueError(msg)
        if parts.query or parts.fragment:
            msg = "has a query or fragment, expected http(s)://host[:port][/path]"
            raise ValueError(msg)
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default, parts.path.rstrip("/"))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A whole answer: status, header fields (names lower-case, in order) and body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def header_list(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def __repr__(self) -> str:  # a body may be a secret (JWE) and a header a cookie
        return f"HttpResponse({self.status}, {len(self.body)} bytes)"


class Transport(Protocol):
    """Sends one request to the origin and reads its whole answer (the seam for tests)."""

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None, *, max_bytes: int
    ) -> HttpResponse: ...

    async def aclose(self) -> None: ...


class _Connection:
    __slots__ = ("_h11", "_reader", "_writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_header_bytes: int) -> None:
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        """The last exchange ended cleanly on both sides, and the peer has not closed (or broken) the connection."""
        return (
            self._h11.our_state is h11.IDLE
            and self._h11.their_state is h11.IDLE
            and not self._reader.at_eof()
            and self._reader.exception() is None
            and not self._writer.is_closing()
        )

    def close(self) -> None:
        self._writer.close()

    async def exchange(self, request: bytes, max_bytes: int) -> HttpResponse:
        """Send `request` (already framed) and read the whole answer; a failure says whether any of it arrived."""
        try:
            self._writer.write(request)
            await self._writer.drain()
        except OSError as exc:
            raise WriteError(_describe(exc)) from None
        received = False
        informational = 0
        response: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                # h11 quotes what it could not parse: a KBS's bytes, cut short for logs and error messages
                raise RemoteProtocolError(clip(str(exc), _MAX_QUOTE_CHARS), answered=received) from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._reader.read(_READ_CHUNK)
                except OSError as exc:
                    raise ReadError(_describe(exc), answered=received) from None
                received = received or bool(data)
                self._h11.receive_data(data)  # b"": the peer closed; h11 says whether that ends the message
            elif isinstance(event, h11.InformationalResponse):
                informational += 1
                if informational > _MAX_INFORMATIONAL:
                    msg = f"more than {_MAX_INFORMATIONAL} informational (1xx) answers"
                    raise RemoteProtocolError(msg, retryable=False, answered=True)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_bytes:
                    raise ResponseTooLarge(max_bytes)  # answered: never retried on a new connection
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed before a whole answer (h11 raises for most of these itself)
                msg = "the connection closed before a complete answer"
                raise RemoteProtocolError(msg, answered=received)
        assert response is not None
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers)
        return HttpResponse(response.status_code, headers, b"".join(chunks))

    def frame(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None) -> bytes:
        try:
            data = self._h11.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data = (data or b"") + (self._h11.send(h11.Data(data=body)) or b"")
            return (data or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:  # its text quotes the offending header, which may be the token or cookie
            msg = "the request cannot be sent as HTTP/1.1 (a header name or value the KBS sent back is not valid)"
            raise HttpError(msg) from None


def _describe(exc: BaseException) -> str:
    """An OS or TLS error's own text (errno and reason; it carries no request data)."""
    return str(exc) or type(exc).__name__


class Pool:
    """Kept-alive HTTP/1.1 connections to one origin (see the module text)."""

    def __init__(
        self,
        origin: Origin,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 16,
        max_idle: int = 8,
        keepalive_s: float = 4.0,
        max_header_bytes: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if origin.tls and ssl_context is None:
            msg = "an https origin needs an SSL context"
            raise ValueError(msg)
        self.origin = origin
        self._ssl = ssl_context if origin.tls else None
        self._host = ("Host", origin.host_header)
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._keepalive_s = keepalive_s
        self._max_header_bytes = max_header_bytes
        self._clock = clock
        self._closed = False

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None, *, max_bytes: int
    ) -> HttpResponse:
        fields = [self._host, *headers.items()]
        if body is not None or method == "POST":
            fields.append(("Content-Length", str(len(body or b""))))
        target = self.origin.prefix + path
        async with self._slots:
            connection = self._take_idle()
            if connection is not None:
                try:
                    return await self._exchange(connection, method, target, fields, body, max_bytes)
                except (WriteError, ReadError, RemoteProtocolError) as exc:
                    if exc.answered or not exc.retryable:  # the KBS saw the request, or it cannot heal
                        raise
                # the KBS closed the kept-alive connection as the request went out: once more on a new one
            connection = await self._connect()
            return await self._exchange(connection, method, target, fields, body, max_bytes)

    async def _exchange(  # noqa: PLR0917 - one request's parts
        self,
        connection: _Connection,
        method: str,
        target: str,
        fields: list[tuple[str, str]],
        body: bytes | None,
        max_bytes: int,
    ) -> HttpResponse:
        done = False
        try:
            response = await connection.exchange(connection.frame(method, target, fields, body), max_bytes)
            done = True
            return response
        finally:  # also on cancellation: a half-read connection is never reused
            if done and connection.reusable and not self._closed and len(self._idle) < self._max_idle:
                connection.idle_since = self._clock()
                self._idle.append(connection)
            else:
                connection.close()

    def _take_idle(self) -> _Connection | None:
        now = self._clock()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to have been closed
            if connection.reusable and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            msg = "the connection pool is closed"
            raise ConnectError(msg, retryable=False)
        origin = self.origin
        try:
            reader, writer = await asyncio.open_connection(
                origin.host,
                origin.port,
                ssl=self._ssl,
                server_hostname=origin.host if self._ssl is not None else None,
                limit=_READ_CHUNK,
            )
        except ssl.SSLCertVerificationError as exc:  # a wrong CA or name does not heal on its own
            raise ConnectError(_describe(exc), retryable=False) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(_describe(exc)) from None
        return _Connection(reader, writer, self._max_header_bytes)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
