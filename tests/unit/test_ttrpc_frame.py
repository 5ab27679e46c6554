"""ttRPC framing: known-answer vectors built by hand from containerd/ttrpc PROTOCOL.md and ttrpc.proto."""

from __future__ import annotations

import ast
import contextlib
import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api import ttrpc_frame
from agent.api._gen import attestation_agent_pb2
from agent.api.ttrpc_frame import (
    HEADER_SIZE,
    MAX_DATA,
    Frame,
    FrameDecoder,
    FrameError,
    FrameHeader,
    FrameTooLargeError,
    MalformedMessageError,
    MessageType,
    RpcRequest,
    RpcResponse,
    UnknownFrameTypeError,
    encode_frame,
)
from agent.errors import InvalidRequest

AA_SERVICE = "attestation_agent.AttestationAgentService"

# ttrpc.Request{service=AA_SERVICE (field 1, 41 bytes), method="GetTeeType" (field 2, 10 bytes)}; the empty
# payload (field 3) and zero timeout (field 4) are proto3 defaults and are not encoded.
GET_TEE_TYPE_REQUEST = (
    bytes.fromhex("0a29") + b"attestation_agent.AttestationAgentService" + bytes.fromhex("120a") + b"GetTeeType"
)
GET_TEE_TYPE_FRAME = (
    bytes.fromhex("00000037")  # data length 55, big-endian
    + bytes.fromhex("00000001")  # stream id 1 (odd: client initiated)
    + bytes.fromhex("01")  # type Request
    + bytes.fromhex("00")  # no flags: unary
    + GET_TEE_TYPE_REQUEST
)

# ttrpc.Response{status=Status{code=12 UNIMPLEMENTED, message="GetTeeType method"}} on stream 3.
UNIMPLEMENTED_RESPONSE = (
    bytes.fromhex("0a15")  # field 1 (status), 21 bytes
    + bytes.fromhex("080c")  # Status.code = 12
    + bytes.fromhex("1211")  # Status.message, 17 bytes
    + b"GetTeeType method"
)
UNIMPLEMENTED_FRAME = bytes.fromhex("00000017000000030200") + UNIMPLEMENTED_RESPONSE

# ttrpc.Response{status=Status{} (present, empty: OK), payload=GetTeeTypeResponse{tee="sample"}}.
SAMPLE_TEE_RESPONSE = bytes.fromhex("0a0012080a06") + b"sample"


class TestKnownAnswers:
    def test_request_frame_bytes(self) -> None:
        data = RpcRequest(service=AA_SERVICE, method="GetTeeType").to_bytes()
        assert data == GET_TEE_TYPE_REQUEST
        assert len(data) == 0x37
        assert encode_frame(1, MessageType.REQUEST, data) == GET_TEE_TYPE_FRAME

    def test_request_frame_decodes(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(GET_TEE_TYPE_FRAME)
        frame = decoder.next_frame()
        assert frame == Frame(stream_id=1, msg_type=MessageType.REQUEST, flags=0, data=GET_TEE_TYPE_REQUEST)
        assert decoder.next_frame() is None
        assert decoder.at_boundary
        assert RpcRequest.from_bytes(frame.data) == RpcRequest(service=AA_SERVICE, method="GetTeeType")

    def test_response_with_status(self) -> None:
        response = RpcResponse(code=12, message="GetTeeType method")
        assert response.to_bytes() == UNIMPLEMENTED_RESPONSE
        assert encode_frame(3, MessageType.RESPONSE, response.to_bytes()) == UNIMPLEMENTED_FRAME
        assert RpcResponse.from_bytes(UNIMPLEMENTED_RESPONSE) == response

    def test_ok_response_carries_an_empty_status(self) -> None:
        inner = attestation_agent_pb2.GetTeeTypeResponse(tee="sample").SerializeToString()
        assert RpcResponse(payload=inner).to_bytes() == SAMPLE_TEE_RESPONSE
        assert RpcResponse.from_bytes(b"") == RpcResponse()  # a missing status means OK

    def test_header_layout(self) -> None:
        header = FrameHeader(length=0x01020304, stream_id=0xA0B0C0D1, msg_type=3, flags=0x05)
        assert header.to_bytes() == bytes.fromhex("01020304a0b0c0d10305")
        assert FrameHeader.parse(header.to_bytes()) == header

    def test_request_with_timeout_and_metadata(self) -> None:
        request = RpcRequest(service="s", method="m", payload=b"\x01", timeout_nano=5, metadata=(("k", "v"),))
        expected = bytes.fromhex("0a017312016d1a010120052a060a016b120176")
        assert request.to_bytes() == expected
        assert RpcRequest.from_bytes(expected) == request


class TestLimits:
    def test_exactly_max_data_is_allowed(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(bytes.fromhex("00400000000000050100"))
        assert decoder.next_frame() is None
        decoder.feed(bytes(MAX_DATA))
        frame = decoder.next_frame()
        assert frame is not None
        assert len(frame.data) == MAX_DATA
        assert len(encode_frame(1, MessageType.REQUEST, bytes(MAX_DATA))) == MAX_DATA + HEADER_SIZE

    def test_one_more_is_rejected_from_the_header_alone(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(bytes.fromhex("00400001000000070100"))
        with pytest.raises(
            FrameTooLargeError, match=re.escape("message length 4194305 exceed maximum message size of 4194304")
        ) as info:
            decoder.next_frame()
        assert info.value.header == FrameHeader(length=MAX_DATA + 1, stream_id=7, msg_type=1)
        assert decoder.buffered == 0

    def test_encode_rejects_one_more(self) -> None:
        with pytest.raises(ValueError, match=re.escape("`data` is 0x400001 bytes, expected at most 0x400000")):
            encode_frame(1, MessageType.REQUEST, bytes(MAX_DATA + 1))

    def test_oversized_data_is_skipped_without_buffering(self) -> None:
        length = 20 << 20  # 20 MiB announced
        decoder = FrameDecoder()
        decoder.feed(FrameHeader(length=length, stream_id=1, msg_type=1).to_bytes() + b"x" * 100)
        with pytest.raises(FrameTooLargeError):
            decoder.next_frame()
        chunk = bytes(64 * 1024)
        fed = 100
        while fed + len(chunk) <= length:
            decoder.feed(chunk)
            fed += len(chunk)
            assert decoder.buffered == 0
            assert decoder.next_frame() is None
        assert not decoder.at_boundary
        decoder.feed(bytes(length - fed) + GET_TEE_TYPE_FRAME)
        frame = decoder.next_frame()
        assert frame is not None
        assert frame.data == GET_TEE_TYPE_REQUEST
        assert decoder.at_boundary

    def test_oversized_then_valid_frame_in_one_chunk(self) -> None:
        decoder = FrameDecoder(max_data=4)
        small = encode_frame(3, MessageType.REQUEST, b"abcd")
        decoder.feed(bytes.fromhex("00000005000000010100") + b"12345" + small[:12])
        with pytest.raises(FrameTooLargeError, match=r"exceed maximum message size of 4$"):
            decoder.next_frame()
        assert decoder.buffered == 12
        decoder.feed(small[12:])
        assert decoder.next_frame() == Frame(stream_id=3, msg_type=MessageType.REQUEST, flags=0, data=b"abcd")

    def test_unknown_type_is_consumed(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(bytes.fromhex("00000002000000010700abcd") + GET_TEE_TYPE_FRAME)
        with pytest.raises(UnknownFrameTypeError, match=re.escape("message type is 0x07, expected 0x01, 0x02 or 0x03")):
            decoder.next_frame()
        assert decoder.next_frame() is not None

    @pytest.mark.parametrize("msg_type", [0x00, 0x04, 0xFF])
    def test_unknown_types(self, msg_type: int) -> None:
        decoder = FrameDecoder()
        decoder.feed(FrameHeader(length=0, stream_id=1, msg_type=msg_type).to_bytes())
        with pytest.raises(UnknownFrameTypeError):
            decoder.next_frame()
        assert decoder.at_boundary

    def test_errors_are_invalid_requests(self) -> None:
        assert issubclass(FrameError, InvalidRequest)
        for cls in (FrameTooLargeError, UnknownFrameTypeError, MalformedMessageError):
            assert issubclass(cls, FrameError)

    def test_header_field_ranges(self) -> None:
        with pytest.raises(ValueError, match=re.escape("`stream_id` is 0x100000000, expected 0 to 0xffffffff")):
            FrameHeader(length=0, stream_id=1 << 32, msg_type=1)
        with pytest.raises(ValueError, match=re.escape("`flags` is 0x100, expected 0 to 0xff")):
            encode_frame(1, MessageType.REQUEST, b"", flags=0x100)
        with pytest.raises(ValueError, match=re.escape("header is 9 bytes, expected 10")):
            FrameHeader.parse(bytes(9))

    def test_decoder_max_data_bounds(self) -> None:
        with pytest.raises(ValueError, match=re.escape("`max_data` is 0x400001, expected at most 0x400000")):
            FrameDecoder(max_data=MAX_DATA + 1)


class TestDecoder:
    def test_one_byte_at_a_time(self) -> None:
        stream = (
            GET_TEE_TYPE_FRAME
            + UNIMPLEMENTED_FRAME
            + encode_frame(5, MessageType.DATA, b"", flags=0x05)
            + GET_TEE_TYPE_FRAME
        )
        decoder = FrameDecoder()
        frames: list[Frame] = []
        for i in range(len(stream)):
            decoder.feed(stream[i : i + 1])
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
            if i + 1 < len(stream):
                assert decoder.buffered <= HEADER_SIZE + 0x37
        assert [(f.stream_id, f.msg_type, f.flags) for f in frames] == [
            (1, MessageType.REQUEST, 0),
            (3, MessageType.RESPONSE, 0),
            (5, MessageType.DATA, 5),
            (1, MessageType.REQUEST, 0),
        ]
        assert frames[1].data == UNIMPLEMENTED_RESPONSE
        assert decoder.at_boundary

    def test_partial_header_is_not_a_boundary(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(GET_TEE_TYPE_FRAME[:3])
        assert decoder.next_frame() is None
        assert not decoder.at_boundary
        assert decoder.buffered == 3

    @pytest.mark.parametrize(
        "data",
        [
            b"\xff",
            bytes.fromhex("0a02fffe"),  # service is not UTF-8
            bytes.fromhex("0a05") + b"ab",  # truncated string
        ],
    )
    def test_malformed_request(self, data: bytes) -> None:
        with pytest.raises(MalformedMessageError, match=r"^request does not decode as ttrpc\.Request$"):
            RpcRequest.from_bytes(data)

    def test_malformed_response(self) -> None:
        with pytest.raises(MalformedMessageError, match=r"^response does not decode as ttrpc\.Response$"):
            RpcResponse.from_bytes(bytes.fromhex("0a05080c"))


frames_strategy = st.lists(
    st.builds(
        Frame,
        stream_id=st.integers(0, 0xFFFFFFFF),
        msg_type=st.sampled_from(MessageType),
        flags=st.integers(0, 0xFF),
        data=st.binary(max_size=300),
    ),
    max_size=8,
)


class TestProperties:
    @settings(max_examples=150)
    @given(frames=frames_strategy, cuts=st.lists(st.integers(0, 3000), max_size=10))
    def test_frames_round_trip_in_any_chunking(self, frames: list[Frame], cuts: list[int]) -> None:
        stream = b"".join(encode_frame(f.stream_id, f.msg_type, f.data, flags=f.flags) for f in frames)
        points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
        decoder = FrameDecoder()
        out: list[Frame] = []
        for start, end in itertools.pairwise(points):
            decoder.feed(stream[start:end])
            while (frame := decoder.next_frame()) is not None:
                out.append(frame)
        assert out == frames
        assert decoder.at_boundary

    @settings(max_examples=150)
    @given(data=st.binary(max_size=200))
    def test_random_bytes_give_frames_or_frame_errors(self, data: bytes) -> None:
        decoder = FrameDecoder(max_data=64)
        decoder.feed(data)
        for _ in range(len(data) + 1):
            try:
                if decoder.next_frame() is None:
                    break
            except (FrameTooLargeError, UnknownFrameTypeError):
                continue
        assert decoder.buffered <= HEADER_SIZE + 64 + len(data)

    @settings(max_examples=150)
    @given(
        request=st.builds(
            RpcRequest,
            service=st.text(max_size=50),
            method=st.text(max_size=20),
            payload=st.binary(max_size=100),
            timeout_nano=st.integers(-(1 << 63), (1 << 63) - 1),
            metadata=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=4).map(tuple),
        )
    )
    def test_request_round_trip(self, request: RpcRequest) -> None:
        assert RpcRequest.from_bytes(request.to_bytes()) == request

    @settings(max_examples=150)
    @given(
        response=st.builds(
            RpcResponse,
            code=st.integers(-(1 << 31), (1 << 31) - 1),
            message=st.text(max_size=50),
            payload=st.binary(max_size=100),
            details=st.lists(st.binary(max_size=20), max_size=3).map(tuple),
        )
    )
    def test_response_round_trip(self, response: RpcResponse) -> None:
        assert RpcResponse.from_bytes(response.to_bytes()) == response

    @settings(max_examples=150)
    @given(data=st.binary(max_size=100))
    def test_random_envelopes_decode_or_raise_malformed(self, data: bytes) -> None:
        for cls in (RpcRequest, RpcResponse):
            with contextlib.suppress(MalformedMessageError):
                cls.from_bytes(data)


def test_frame_module_is_pure() -> None:
    tree = ast.parse(Path(ttrpc_frame.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "os", "structlog", "fcntl", "selectors", "threading"}
