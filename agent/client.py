"""A small synchronous gRPC client for the CLI commands. Edge (socket).

Reachability is decided by phase, not by message text: if the channel to the agent's socket does not become ready,
the agent is unreachable (exit 3); once it is, any error status is the agent's answer (a KBS that is down is
reported by the agent as UNAVAILABLE, exit 1).
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

__all__ = ["AgentUnreachable", "CallFailed", "call"]

M = TypeVar("M", bound=Message)


class AgentUnreachable(Exception):
    """The agent's socket does not answer."""


class CallFailed(Exception):
    """The agent answered with an error status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


CONNECT_TIMEOUT_S = 5.0


def call(socket: str, path: str, request: Message, response_type: type[M], *, timeout_s: float = 120.0) -> M:
    target = (
        socket if socket.startswith("unix:") or (":" in socket and not socket.startswith("/")) else f"unix:{socket}"
    )
    with grpc.insecure_channel(target) as channel:
        stub: Any = channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            msg = f"the agent is not reachable at {socket} (is `cvm-agent serve` running? see --socket)"
            raise AgentUnreachable(msg) from None
        try:
            reply: M = stub(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CallFailed(code.name if code else "UNKNOWN", details or "") from exc
        return reply
