"""ttRPC transport over the shared method table. Edge (thin adapter).

Builds a `TtrpcServer` whose handlers call `Method.invoke`, so ttRPC and gRPC run the same code per RPC.
Services that the reference declares but this process does not serve can be listed so that callers get the
reference's NOT_FOUND answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from agent.api.budget import ReplyBudget
from agent.api.methods import Method, ReplyLimit
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import REPLY_ADMISSION, REQUEST_DEADLINE, TtrpcServer, UnaryHandler
from agent.api.ttrpc_frame import MAX_DATA
from agent.log import get_logger
from agent.secret import clip

__all__ = ["build_ttrpc_server"]

log = get_logger("agent.ttrpc")


def _response_size(payload_size: int) -> int:
    """Bytes of a `ttrpc.Response` with an OK status (2 bytes) and a payload of `payload_size` bytes."""
    return 2 + 1 + len(_varint(payload_size)) + payload_size


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


_MAX_PAYLOAD = next(size for size in range(MAX_DATA, MAX_DATA - 16, -1) if _response_size(size) <= MAX_DATA)
# ttrpc-rust answers a reply over the frame limit with this status and text; the log line says the same
_REPLY_LIMIT = ReplyLimit(
    _MAX_PAYLOAD,
    lambda size: RpcError(
        StatusCode.INVALID_ARGUMENT,
        f"message length {_response_size(size)} exceed maximum message size of {MAX_DATA}",
    ),
)


def _handler(method: Method) -> UnaryHandler:
    async def handle(payload: bytes) -> bytes:
        deadline, admit = REQUEST_DEADLINE.get(), REPLY_ADMISSION.get()
        return await method.invoke(payload, transport="ttrpc", deadline=deadline, reply_limit=_REPLY_LIMIT, admit=admit)

    return handle


def build_ttrpc_server(
    methods: Iterable[Method],
    *,
    declared_but_unimplemented: Mapping[str, Iterable[str]] | None = None,
    reply_budget: ReplyBudget | None = None,
) -> TtrpcServer:
    """A `TtrpcServer` for `methods`, logging as the gRPC server does; `reply_budget` may be shared with other
    servers (see `agent.api.budget`)."""
    handlers: dict[str, dict[str, UnaryHandler]] = defaultdict(dict)
    by_path: dict[str, Method] = {}
    for method in methods:
        handlers[method.service][method.name] = _handler(method)
        by_path[method.path] = method

    def on_call(service: str, method: str, code: StatusCode, duration_s: float) -> None:
        # Calls that reached a Method were logged by it; this is the one line for those that did not
        # (undecodable request, unknown service or method, declared but not served).
        if method in handlers.get(service, {}):
            return
        log.warning(
            "rpc",
            rpc=clip(f"/{service}/{method}"),
            transport="ttrpc",
            code=code.name,
            duration_ms=round(duration_s * 1000, 2),
        )

    def on_event(event: str, fields: Mapping[str, object]) -> None:
        method, error, waited_s = by_path.get(str(fields.get("rpc"))), fields.get("error"), fields.get("duration_s")
        if method is not None and isinstance(error, RpcError) and isinstance(waited_s, float):
            # refused before its handler ran: the Method writes the call's line, as for the calls it ran
            method.refused(error, transport="ttrpc", duration_s=waited_s)
            return
        values = {k: v for k, v in fields.items() if isinstance(v, str | int | float | bool)}
        if event == "ttrpc.reply.refused":  # a reply a handler did not admit (not a Method's)
            log.warning(event, code="RESOURCE_EXHAUSTED", **values)
        else:
            log.info(event, **values)

    def on_error(service: str, method: str, exc: BaseException) -> None:
        log.error("ttrpc.handler_crash", rpc=f"/{service}/{method}", error=type(exc).__name__)

    return TtrpcServer(
        handlers,
        declared_but_unimplemented=declared_but_unimplemented,
        reply_budget=reply_budget,
        on_call=on_call,
        on_event=on_event,
        on_error=on_error,
    )
