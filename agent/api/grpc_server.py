"""gRPC transport (grpc.aio) over the shared method table. Edge (sockets).

Requests are passed to `Method.invoke` as raw bytes (no generated servicer classes), so gRPC and ttRPC run
exactly the same code per RPC.

Bounds against hostile local clients (all enforced by gRPC core):

    what                               bound
    ---------------------------------  ----------------------------------------------------------------
    message, either way                4 MiB (a larger reply is answered RESOURCE_EXHAUSTED)
    request headers (metadata)         16 KiB
    connections                        `MAX_CONNECTIONS`; further ones are refused
    HTTP/2 preface (handshake)         10 s, then the connection is closed (slowloris)
    idle connection                    closed (GOAWAY) after 10 s without calls; gRPC clients reconnect
    calls                              `MAX_STREAMS` (32) streams per connection (a lower limit refuses
                                       a client's opening burst: streams sent before our SETTINGS);
                                       `MAX_HANDLERS` (16) handlers at work, of which at most 4 for
                                       methods that have made a reply over 64 KiB (`HandlerSlots`);
                                       a further call waits up to 10 s for one, then is answered
                                       RESOURCE_EXHAUSTED
    peer that does not read            keepalive pings every 2 s, SETTINGS and pings must be answered
                                       within 5 s: such a peer is dropped with everything it holds
    replies over 64 KiB                charged by the handler to the process's reply budget (shared
                                       with ttRPC; `agent.api.budget`) until the call ends, which for
                                       a peer that does not read is when it is dropped; a reply the
                                       budget refuses is dropped and answered RESOURCE_EXHAUSTED; a
                                       call of a method that has made a large reply reserves that size
                                       before its handler runs (waiting up to 10 s) and is refused so,
                                       with no work done

What gRPC core still holds outside the budget: request messages (≤ 4 MiB) of up to `MAX_STREAMS` calls per
connection, waiting for a handler, and its own HTTP/2 buffers. The handlers' working memory is bounded by the
4 heavy slots once a method is known to be heavy; the first calls of a method, before it has made a large
reply, run under `MAX_HANDLERS` only.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import defaultdict
from collections.abc import Iterable

import grpc
import grpc.aio

from agent.api.budget import Charge, HandlerSlots, ReplyBudget, Slot
from agent.api.methods import Method, ReplyLimit
from agent.api.sockets import prepare_socket_path, remove_socket, secure_socket
from agent.api.status import RpcError, StatusCode
from agent.config import ListenAddress

__all__ = ["MAX_CONNECTIONS", "MAX_HANDLERS", "MAX_MESSAGE_BYTES", "GrpcServer"]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_CONNECTIONS = 64
MAX_HANDLERS = 16
MAX_STREAMS = 32
"""Calls open at once on one connection: a peer that never reads holds at most this many replies (≤ 4 MiB
each) until it is dropped. Lower limits refuse a client's opening burst (streams sent before our SETTINGS)."""
_REPLY_LIMIT = ReplyLimit(
    MAX_MESSAGE_BYTES,
    lambda size: RpcError(
        StatusCode.RESOURCE_EXHAUSTED, f"response is {size} bytes, expected at most {MAX_MESSAGE_BYTES}"
    ),
)
_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 16 * 1024),
    ("grpc.absolute_max_metadata_size", 16 * 1024),
    ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 10_000),
    ("grpc.max_concurrent_streams", MAX_STREAMS),
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.settings_timeout", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.so_reuseport", 0),
]
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Handlers:
    """At most `limit` handlers at work; a call waits up to `wait_s` for one, then is RESOURCE_EXHAUSTED.

    grpc.aio's own `maximum_concurrent_rpcs` also counts calls whose reply waits for the peer, and refuses
    at once: peers that never read would hold every slot and shut others out until the keepalive drops them.
    """

    def __init__(self, limit: int, wait_s: float = 10.0) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self._slots: HandlerSlots | None = None

    def slots(self) -> HandlerSlots:
        if self._slots is None:  # created on the server's loop
            self._slots = HandlerSlots(self.limit)
        return self._slots


async def _start(method: Method, handlers: _Handlers, budget: ReplyBudget) -> tuple[Slot, Charge | None] | RpcError:
    """A handler slot for a call of `method`, with the reservation of its reply if the method is heavy (see
    `agent.api.budget`); or the error to answer when no slot is free in time or the budget has no room."""
    slots = handlers.slots()
    try:
        async with asyncio.timeout(handlers.wait_s):
            started = await slots.start(method.path, budget)
    except TimeoutError:
        text = f"more than {handlers.limit} calls in progress for {handlers.wait_s:g} s"
        return RpcError(StatusCode.RESOURCE_EXHAUSTED, text)
    return started if started is not None else budget.refusal(slots.reply_size(method.path))


def _handler(method: Method, handlers: _Handlers, budget: ReplyBudget) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def behaviour(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        started = time.monotonic()
        remaining: float | None = context.time_remaining()  # None without a deadline (typed float)
        deadline = started + remaining if remaining is not None else None
        slots = handlers.slots()
        started_call = await _start(method, handlers, budget)
        if isinstance(started_call, RpcError):  # no work done: the Method writes the call's line
            method.refused(started_call, transport="grpc", duration_s=time.monotonic() - started)
            await context.abort(_GRPC_CODES[int(started_call.code)], started_call.message)
        slot, reserved = started_call
        charged: list[Charge] = []

        async def admit(size: int) -> None:
            """Before the call's log line: charge the reply to the budget, or refuse it (`ReplyRefused`)."""
            nonlocal reserved
            slot.release()  # what follows waits for the budget and the peer, not for the agent
            slots.made(method.path, size)
            taken, reserved = reserved, None
            charge = await budget.charge_reply(size, taken)
            if charge is None:
                raise budget.refusal(size)  # the reply is dropped with this call
            charged.append(charge)

        try:
            try:
                reply = await method.invoke(
                    request, transport="grpc", deadline=deadline, reply_limit=_REPLY_LIMIT, admit=admit
                )
            except RpcError as exc:
                await context.abort(_GRPC_CODES[int(exc.code)], exc.message)
                raise  # pragma: no cover - abort raises
        except BaseException:
            for charge in charged:
                charge.release()
            raise
        finally:
            slot.release()
            if reserved is not None:
                reserved.release()
        del request
        (charge,) = charged
        # gRPC core holds the reply until the peer has taken it or the call ends (the peer is gone)
        context.add_done_callback(lambda _context: charge.release())  # type: ignore[arg-type]  # stub: a class
        return reply

    return grpc.unary_unary_rpc_method_handler(behaviour)


class GrpcServer:
    """Serves the method table on unix sockets and optional loopback TCP addresses.

    `reply_budget` bounds the replies held for peers (shared with the ttRPC servers in the daemon).
    """

    def __init__(
        self, methods: Iterable[Method], addresses: Iterable[ListenAddress], *, reply_budget: ReplyBudget | None = None
    ) -> None:
        self._addresses = list(addresses)
        by_service: dict[str, dict[str, grpc.RpcMethodHandler[bytes, bytes]]] = defaultdict(dict)
        handlers = _Handlers(MAX_HANDLERS)
        self.reply_budget = reply_budget if reply_budget is not None else ReplyBudget()
        for method in methods:
            by_service[method.service][method.name] = _handler(method, handlers, self.reply_budget)
        self._server = grpc.aio.server(options=_OPTIONS)
        self._server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(service, handlers) for service, handlers in by_service.items()]
        )
        self._unix_paths: list[str] = []

    async def start(self) -> None:
        """Bind every address (owner-only unix sockets) and start serving."""
        for address in self._addresses:
            if address.unix_path is not None:
                prepare_socket_path(address.unix_path)
                old = os.umask(0o177)  # the socket is created 0600: no window where others could connect
                try:
                    self._bind(address)
                finally:
                    os.umask(old)
                secure_socket(address.unix_path)
                self._unix_paths.append(address.unix_path)
            else:
                self._bind(address)
        await self._server.start()

    def _bind(self, address: ListenAddress) -> None:
        try:
            port = self._server.add_insecure_port(address.grpc_target())
        except RuntimeError as exc:
            port = 0
            cause: Exception | None = exc
        else:
            cause = None
        if port == 0:
            msg = f"cannot listen on {address}"
            raise OSError(msg) from cause

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish within `grace_s`, remove the socket files."""
        await self._server.stop(grace_s)
        for path in self._unix_paths:
            remove_socket(path)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


assert _GRPC_CODES[int(StatusCode.INVALID_ARGUMENT)] is grpc.StatusCode.INVALID_ARGUMENT
