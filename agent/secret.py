"""`Secret`: bytes that never show themselves, and the one safe description of an exception. Pure.

Secret material (resource bytes, KEKs, layer keys, private keys, tokens) is held as `Secret` where it is kept
for a while (caches), so that no `repr`, `str`, f-string or log processor can print it by accident: the value
comes out only through `reveal()`.

`describe_exception` is what every log line and crash report says about an exception: its type, a short
message only when the exception's class promises a caller-safe text (`AgentError`, `RpcError`), the errno name
of an `OSError`, and a stack of `file:line:function` positions. It never reads frame locals, arguments or the
text of other exceptions (a `ValueError` may quote a key).
"""

from __future__ import annotations

import errno as errno_names
from types import TracebackType
from typing import Final

__all__ = ["MAX_MESSAGE_CHARS", "Secret", "clip", "describe_exception", "stack_positions"]

MAX_MESSAGE_CHARS: Final = 200
"""The most characters of any caller-influenced text that a log line or an error reply carries."""
MAX_STACK_FRAMES: Final = 40


class Secret:
    """An immutable byte string that reveals itself only on request.

    >>> key = Secret(b"k" * 32)
    >>> key
    <Secret 32 bytes>
    >>> f"{key}"
    '<Secret 32 bytes>'
    >>> len(key.reveal())
    32
    """

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The value, for the code that must use it (decryption, the RPC reply)."""
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<Secret {len(self._value)} bytes>"

    __str__ = __repr__

    def __format__(self, _spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> tuple[object, ...]:
        msg = "a Secret is not pickled"
        raise TypeError(msg)


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters, with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def _short_file(path: str) -> str:
    for anchor in ("/agent/", "/site-packages/", "/tests/", "/lib/python"):
        index = path.rfind(anchor)
        if index >= 0:
            return path[index + 1 :]
    return path.rsplit("/", 1)[-1]


def stack_positions(tb: TracebackType | None) -> list[str]:
    """`file:line:function` for each frame of `tb`, innermost last; nothing else of the frame is read."""
    positions: list[str] = []
    while tb is not None:
        code = tb.tb_frame.f_code
        positions.append(f"{_short_file(code.co_filename)}:{tb.tb_lineno}:{code.co_name}")
        tb = tb.tb_next
    if len(positions) > MAX_STACK_FRAMES:
        positions = [*positions[:5], "…", *positions[-(MAX_STACK_FRAMES - 6) :]]
    return positions


def _safe_message(exc: BaseException) -> str:
    # Local imports keep this module free of the API package; both classes promise caller-safe texts.
    from agent.api.status import RpcError
    from agent.errors import AgentError

    if isinstance(exc, AgentError | RpcError):
        return clip(str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno_names.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror}" if exc.strerror else name
    return "(message withheld: it may quote values)"


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def describe_exception(exc: BaseException) -> dict[str, object]:
    """Log fields for `exc`: `exc_type`, `exc_message`, `stack`, and `causes` (types of chained exceptions)."""
    fields: dict[str, object] = {
        "exc_type": _type_name(exc),
        "exc_message": _safe_message(exc),
        "stack": stack_positions(exc.__traceback__),
    }
    causes: list[str] = []
    seen = {id(exc)}
    chained = exc.__cause__ or exc.__context__
    while chained is not None and id(chained) not in seen and len(causes) < 8:
        seen.add(id(chained))
        last = stack_positions(chained.__traceback__)[-1:]
        causes.append(f"{_type_name(chained)} at {last[0]}" if last else _type_name(chained))
        chained = chained.__cause__ or chained.__context__
    if causes:
        fields["causes"] = causes
    return fields
