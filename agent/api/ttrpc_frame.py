"""ttRPC wire format: frames, an incremental decoder and the request/response envelopes. Pure.

A frame is a 10-byte header followed by `length` bytes of data (containerd/ttrpc `PROTOCOL.md`):

    offset  size  field
    0x0     4     data length, u32 big-endian, at most `MAX_DATA` (4 MiB)
    0x4     4     stream id, u32 big-endian (odd: opened by the client)
    0x8     1     message type (1 Request, 2 Response, 3 Data)
    0x9     1     flags, meaning defined per type

The data of a Request frame is a protobuf `ttrpc.Request`; that of a Response frame a `ttrpc.Response`
(generated in `agent.api._gen.ttrpc_pb2`). This module only builds and parses bytes; it does no I/O.

    >>> frame = encode_frame(1, MessageType.REQUEST, RpcRequest(service="s.S", method="M").to_bytes())
    >>> decoder = FrameDecoder()
    >>> decoder.feed(frame)
    >>> decoder.next_frame().stream_id
    1
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import Final

from google.protobuf.message import DecodeError

from agent.api._gen import ttrpc_pb2
from agent.errors import InvalidRequest

__all__ = [
    "FLAG_NO_DATA",
    "FLAG_REMOTE_CLOSED",
    "FLAG_REMOTE_OPEN",
    "HEADER_SIZE",
    "MAX_DATA",
    "MAX_STREAM_ID",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameHeader",
    "FrameTooLargeError",
    "MalformedMessageError",
    "MessageType",
    "RpcRequest",
    "RpcResponse",
    "UnknownFrameTypeError",
    "encode_frame",
]

HEADER_SIZE: Final = 10
MAX_DATA: Final = 4 << 20  # 4 MiB, the largest data length either side accepts
MAX_STREAM_ID: Final = 0xFFFF_FFFF

# Request flags (streaming only; a unary request has no flags).
FLAG_REMOTE_CLOSED: Final = 0x01
FLAG_REMOTE_OPEN: Final = 0x02
# Data flag.
FLAG_NO_DATA: Final = 0x04

_HEADER: Final = struct.Struct(">IIBB")
assert _HEADER.size == HEADER_SIZE


class MessageType(enum.IntEnum):
    """The frame's message type byte."""

    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03


class FrameError(InvalidRequest):
    """Bytes from a peer that do not form a valid ttRPC frame or envelope."""


class FrameTooLargeError(FrameError):
    """A header announced more than `MAX_DATA` bytes of data.

    The decoder raises this from the header alone and then discards the announced data as it arrives,
    so the caller may answer on `header.stream_id` and keep reading.
    """

    def __init__(self, header: FrameHeader, limit: int) -> None:
        super().__init__(f"message length {header.length} exceed maximum message size of {limit}")
        self.header = header
        self.limit = limit


class UnknownFrameTypeError(FrameError):
    """A header carried a message type other than Request, Response or Data.

    The decoder has consumed that frame (header and data); the caller may ignore it and keep reading.
    """

    def __init__(self, header: FrameHeader) -> None:
        super().__init__(f"message type is {header.msg_type:#04x}, expected 0x01, 0x02 or 0x03")
        self.header = header


class MalformedMessageError(FrameError):
    """A frame's data does not decode as the `ttrpc.Request` or `ttrpc.Response` it should carry."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FrameHeader:
    """The 10-byte frame header; `msg_type` is kept as a raw byte so that unknown types can be reported."""

    length: int
    stream_id: int
    msg_type: int
    flags: int = 0

    def __post_init__(self) -> None:
        _check_range("length", self.length, MAX_STREAM_ID)
        _check_range("stream_id", self.stream_id, MAX_STREAM_ID)
        _check_range("msg_type", self.msg_type, 0xFF)
        _check_range("flags", self.flags, 0xFF)

    @classmethod
    def parse(cls, data: bytes) -> FrameHeader:
        """Parse exactly `HEADER_SIZE` bytes. Any byte values form a header; nothing is validated here."""
        if len(data) != HEADER_SIZE:
            msg = f"header is {len(data)} bytes, expected {HEADER_SIZE}"
            raise ValueError(msg)
        length, stream_id, msg_type, flags = _HEADER.unpack(data)
        return cls(length=length, stream_id=stream_id, msg_type=msg_type, flags=flags)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(self.length, self.stream_id, self.msg_type, self.flags)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Frame:
    """A complete frame of a known type with at most `MAX_DATA` bytes of data."""

    stream_id: int
    msg_type: MessageType
    flags: int
    data: bytes


def encode_frame(stream_id: int, msg_type: MessageType, data: bytes, *, flags: int = 0) -> bytes:
    """Return header + data.

    Raises:
        ValueError: `data` is longer than `MAX_DATA`, or a header field is out of range.
    """
    if len(data) > MAX_DATA:
        msg = f"`data` is {len(data):#x} bytes, expected at most {MAX_DATA:#x}"
        raise ValueError(msg)
    header = FrameHeader(length=len(data), stream_id=stream_id, msg_type=msg_type, flags=flags)
    return header.to_bytes() + data


class FrameDecoder:
    """Incremental decoder: `feed()` bytes as they arrive, then call `next_frame()` until it returns None.

    Memory stays bounded: at most one header plus `max_data` bytes of a frame are kept beyond what has been
    fed and not yet consumed. An oversized frame is reported from its header and its data is dropped as it
    arrives, never buffered. After a `FrameTooLargeError` or `UnknownFrameTypeError` the decoder stays usable.
    """

    def __init__(self, *, max_data: int = MAX_DATA) -> None:
        if not 0 <= max_data <= MAX_DATA:
            msg = f"`max_data` is {max_data:#x}, expected at most {MAX_DATA:#x}"
            raise ValueError(msg)
        self._max_data = max_data
        self._buf = bytearray()
        self._header: FrameHeader | None = None  # parsed header of the frame whose data is awaited
        self._discard = 0  # data bytes of a rejected frame still to drop

    @property
    def buffered(self) -> int:
        """Bytes held for frames not yet complete (excluding data that is being discarded)."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending, i.e. end of input here is a clean end of stream."""
        return not self._buf and self._header is None and self._discard == 0

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = data[skipped:]
        self._buf += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed.

        Raises:
            FrameTooLargeError: the next header announces more than `max_data` bytes (its data is skipped).
            UnknownFrameTypeError: the next complete frame has an unknown message type (it has been consumed).
        """
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            header = FrameHeader.parse(bytes(self._buf[:HEADER_SIZE]))
            del self._buf[:HEADER_SIZE]
            if header.length > self._max_data:
                self._skip(header.length)
                raise FrameTooLargeError(header, self._max_data)
            self._header = header
        header = self._header
        if len(self._buf) < header.length:
            return None
        data = bytes(self._buf[: header.length])
        del self._buf[: header.length]
        self._header = None
        try:
            msg_type = MessageType(header.msg_type)
        except ValueError:
            raise UnknownFrameTypeError(header) from None
        return Frame(stream_id=header.stream_id, msg_type=msg_type, flags=header.flags, data=data)

    def _skip(self, count: int) -> None:
        now = min(count, len(self._buf))
        del self._buf[:now]
        self._discard = count - now


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RpcRequest:
    """A `ttrpc.Request`: routing, the inner payload, a deadline and metadata pairs (keys may repeat)."""

    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = ()

    def to_bytes(self) -> bytes:
        """Encode as protobuf.

        Raises:
            ValueError: `timeout_nano` does not fit an int64.
        """
        msg = ttrpc_pb2.Request(
            service=self.service,
            method=self.method,
            payload=self.payload,
            timeout_nano=self.timeout_nano,
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in self.metadata],
        )
        return msg.SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> RpcRequest:
        """Decode the data of a Request frame. Unknown fields are ignored.

        Raises:
            MalformedMessageError: not a valid `ttrpc.Request` (bad wire format, bad UTF-8 in a string).
        """
        msg = ttrpc_pb2.Request()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            text = "request does not decode as ttrpc.Request"
            raise MalformedMessageError(text) from exc
        return cls(
            service=msg.service,
            method=msg.method,
            payload=msg.payload,
            timeout_nano=msg.timeout_nano,
            metadata=tuple((kv.key, kv.value) for kv in msg.metadata),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RpcResponse:
    """A `ttrpc.Response`: a google.rpc status (code kept as a raw int32) and the inner payload."""

    code: int = 0
    message: str = ""
    payload: bytes = b""
    details: tuple[bytes, ...] = ()

    def to_bytes(self) -> bytes:
        """Encode as protobuf. The status field is always present, also for OK (as ttrpc-rust sends it).

        Raises:
            ValueError: `code` does not fit an int32.
        """
        status = ttrpc_pb2.Status(code=self.code, message=self.message, details=list(self.details))
        return ttrpc_pb2.Response(status=status, payload=self.payload).SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> RpcResponse:
        """Decode the data of a Response frame; a missing status means OK.

        Raises:
            MalformedMessageError: not a valid `ttrpc.Response`.
        """
        msg = ttrpc_pb2.Response()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            text = "response does not decode as ttrpc.Response"
            raise MalformedMessageError(text) from exc
        return cls(
            code=msg.status.code,
            message=msg.status.message,
            payload=msg.payload,
            details=tuple(msg.status.details),
        )


def _check_range(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        msg = f"`{name}` is {value:#x}, expected 0 to {maximum:#x}"
        raise ValueError(msg)
