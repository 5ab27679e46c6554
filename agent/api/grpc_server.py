"""gRPC transport (grpc.aio) over the shared method table. Edge (sockets).

Requests are passed to `Method.invoke` as raw bytes (no generated servicer classes), so gRPC and ttRPC run
exactly the same code per RPC.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable

import grpc
import grpc.aio

from agent.api.methods import Method
from agent.api.sockets import prepare_socket_path, remove_socket, secure_socket
from agent.api.status import RpcError, StatusCode
from agent.config import ListenAddress

__all__ = ["MAX_MESSAGE_BYTES", "GrpcServer"]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _handler(method: Method) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def behaviour(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            return await method.invoke(request, transport="grpc")
        except RpcError as exc:
            await context.abort(_GRPC_CODES[int(exc.code)], exc.message)
            raise  # pragma: no cover - abort raises

    return grpc.unary_unary_rpc_method_handler(behaviour)


class GrpcServer:
    """Serves the method table on unix sockets and optional loopback TCP addresses."""

    def __init__(self, methods: Iterable[Method], addresses: Iterable[ListenAddress]) -> None:
        self._addresses = list(addresses)
        by_service: dict[str, dict[str, grpc.RpcMethodHandler[bytes, bytes]]] = defaultdict(dict)
        for method in methods:
            by_service[method.service][method.name] = _handler(method)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=256,
        )
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
