"""Transport-neutral RPC status: google.rpc codes and the error a handler raises. Pure.

Both transports (gRPC and ttRPC) carry the same numeric codes, so a handler raises `RpcError` once and each
transport encodes it in its own way.
"""

from __future__ import annotations

import enum

__all__ = ["ReplyRefused", "RpcError", "StatusCode"]


class StatusCode(enum.IntEnum):
    """google.rpc.Code values, shared by gRPC and ttRPC."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """An RPC failure with a status code and a message that is safe to send to the caller."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.message!r})"


class ReplyRefused(RpcError):
    """A reply made but not sent: over the transport's message limit, or refused by the reply budget.

    The caller gets `code` and `message`; `fields` are for the call's one log line: `length` (the refused
    reply's bytes) and what refused it: `limit` (the message limit or the budget's size) and, for the
    budget, `held` (the bytes it held when it refused).
    """

    def __init__(self, code: StatusCode, message: str, *, length: int, limit: int, held: int | None = None) -> None:
        super().__init__(code, message)
        self.fields: dict[str, int] = {"length": length, "limit": limit}
        if held is not None:
            self.fields["held"] = held

    def __repr__(self) -> str:
        return f"ReplyRefused({self.code.name}, {self.message!r}, {self.fields!r})"
