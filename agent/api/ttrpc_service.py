"""ttRPC transport over the shared method table. Edge (thin adapter).

Builds a `TtrpcServer` whose handlers call `Method.invoke`, so ttRPC and gRPC run the same code per RPC.
Services that the reference declares but this process does not serve can be listed so that callers get the
reference's NOT_FOUND answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import structlog

from agent.api.methods import Method
from agent.api.ttrpc import TtrpcServer, UnaryHandler

__all__ = ["build_ttrpc_server"]

log = structlog.get_logger("agent.ttrpc")


def _handler(method: Method) -> UnaryHandler:
    async def handle(payload: bytes) -> bytes:
        return await method.invoke(payload, transport="ttrpc")

    return handle


def build_ttrpc_server(
    methods: Iterable[Method], *, declared_but_unimplemented: Mapping[str, Iterable[str]] | None = None
) -> TtrpcServer:
    handlers: dict[str, dict[str, UnaryHandler]] = defaultdict(dict)
    for method in methods:
        handlers[method.service][method.name] = _handler(method)

    def on_event(event: str, fields: Mapping[str, object]) -> None:
        log.info(f"ttrpc.{event}", **{k: v for k, v in fields.items() if isinstance(v, str | int | float | bool)})

    def on_error(service: str, method: str, exc: BaseException) -> None:
        log.error("ttrpc.handler_crash", rpc=f"/{service}/{method}", error=type(exc).__name__)

    return TtrpcServer(
        handlers, declared_but_unimplemented=declared_but_unimplemented, on_event=on_event, on_error=on_error
    )
