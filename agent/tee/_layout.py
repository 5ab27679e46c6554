"""Fixed-layout helpers shared by the TD report / quote, SNP report and event-log parsers. Pure.

One definition of a field span, of little-endian reads, of the reserved-range check (with the one message
template "<what> byte at 0x.. is 0x.., expected 0x00 (reserved range ..)") and of constructor argument checks.
"""

from __future__ import annotations

from typing import NamedTuple

from agent.errors import EvidenceParseError

__all__ = ["Span", "check_int", "check_size", "require_zero", "take", "u16", "u32"]


class Span(NamedTuple):
    """A fixed field: `size` bytes at `start` (relative to the structure it belongs to)."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


def take(data: bytes, span: Span, base: int = 0) -> bytes:
    return data[base + span.start : base + span.end]


def u16(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def u32(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def require_zero(data: bytes, span: Span, what: str, base: int = 0) -> None:
    """Raise if any byte of the reserved range is non-zero; the message names the first offending byte."""
    for i, byte in enumerate(take(data, span, base)):
        if byte:
            at = base + span.start + i
            msg = (
                f"{what} byte at 0x{at:x} is 0x{byte:02x}, expected 0x00 "
                f"(reserved range 0x{base + span.start:x}..0x{base + span.end:x})"
            )
            raise EvidenceParseError(msg, offset=at)


def check_size(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        msg = f"`{name}` must be bytes, not {type(value).__name__}"
        raise TypeError(msg)
    if len(value) != size:
        msg = f"`{name}` length is 0x{len(value):x}, expected 0x{size:x}"
        raise ValueError(msg)


def check_int(name: str, value: object, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"`{name}` must be an int, not {type(value).__name__}"
        raise TypeError(msg)
    if not 0 <= value <= maximum:
        msg = f"`{name}` is 0x{value:x}, expected 0x0..0x{maximum:x}"
        raise ValueError(msg)
