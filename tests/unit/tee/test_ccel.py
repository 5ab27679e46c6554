"""CCEL event logs, RTMR replay, AAEL entries and `cc_eventlog` assembly against the real vectors."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import EvidenceParseError
from agent.tee import ccel, tdx
from agent.tee.ccel import AaelEvent, TcgAlgorithm
from tests.unit.tee.vectorutil import put, read

# (log under vectors/, key in hw/expected.json or None, Trustee's expected parse or None)
LOGS = [
    ("hw/tdx/ccel_gcp_cos113/ccel_data.bin", "tdx/ccel_gcp_cos113/ccel_data.bin", None),
    (
        "hw/tdx/ccel_trustee/CCEL_data_ovmf.bin",
        "tdx/ccel_trustee/CCEL_data_ovmf.bin",
        "hw/tdx/ccel_trustee/CCEL_data_ovmf_out.json",
    ),
    (
        "hw/tdx/ccel_trustee/CCEL_data_grub.bin",
        "tdx/ccel_trustee/CCEL_data_grub.bin",
        "hw/tdx/ccel_trustee/CCEL_data_grub_out.json",
    ),
    (
        "hw/tdx/ccel_trustee/CCEL_data_grub_gke.bin",
        "tdx/ccel_trustee/CCEL_data_grub_gke.bin",
        "hw/tdx/ccel_trustee/CCEL_data_grub_gke_out.json",
    ),
    (
        "trustee/eventlog/CCEL_data_ovmf",
        "tdx/ccel_trustee/CCEL_data_ovmf.bin",
        "trustee/eventlog/CCEL_data_ovmf_out.json",
    ),
    (
        "trustee/eventlog/CCEL_data_grub",
        "tdx/ccel_trustee/CCEL_data_grub.bin",
        "trustee/eventlog/CCEL_data_grub_out.json",
    ),
    ("trustee/tdx/CCEL_data", None, "trustee/eventlog/CCEL_data_out.json"),
    ("trustee/eventlog/CCEL_AAEL_alibabacloud", None, "trustee/eventlog/CCEL_AAEL_alibabacloud_out.json"),
]
COS = "hw/tdx/ccel_gcp_cos113/ccel_data.bin"
OVMF = "hw/tdx/ccel_trustee/CCEL_data_ovmf.bin"
GKE = "hw/tdx/ccel_trustee/CCEL_data_grub_gke.bin"
ALIBABA = "trustee/eventlog/CCEL_AAEL_alibabacloud"
ALG_NAMES = {"SHA-384": TcgAlgorithm.SHA384, "SHA-256": TcgAlgorithm.SHA256, "SM3": TcgAlgorithm.SM3_256}

# guest-components `EL_HEADER` (attestation-agent/attester/src/utils.rs at 8246e5e0), guest-api.md §5.2
GC_HEADER_HEX = "0000000003000000" + "00" * 20 + "25000000" + "00" * 16 + "0000000000000000020000000c0030001200200000"


class TestLogVectors:
    @pytest.mark.parametrize(("rel", "key", "out"), LOGS, ids=[x[0] for x in LOGS])
    def test_parse_round_trip_and_expected(
        self, vectors: Path, expected: dict[str, Any], rel: str, key: str | None, out: str | None
    ) -> None:
        data = read(vectors, rel)
        log = ccel.parse_event_log(data)
        assert log.to_bytes() == data
        assert log.has_end_marker
        assert log.spec_id.algorithms == (ccel.DigestSize(alg_id=TcgAlgorithm.SHA384, size=48),)
        assert log.spec_id.signature == ccel.SPEC_ID_SIGNATURE
        if key is not None:
            want = expected[key]
            assert hashlib.sha256(data).hexdigest() == want["sha256"]
            assert len(log.events) == want["events_after_specid"]
            assert len(log.log_bytes()) == want["log_end_offset"]
            assert [[hex(a.alg_id), a.size] for a in log.spec_id.algorithms] == want["digest_algs"]
            rtmrs = ccel.replay_rtmrs(log)
            assert [r.hex() for r in rtmrs] == [want["replayed_rtmr"][f"rtmr{i}"] for i in range(4)]
        json.dumps(log.to_dict())

    @pytest.mark.parametrize(("rel", "out"), [(x[0], x[2]) for x in LOGS if x[2]], ids=[x[0] for x in LOGS if x[2]])
    def test_matches_trustee_decoding(self, vectors: Path, rel: str, out: str) -> None:
        log = ccel.parse_event_log(read(vectors, rel))
        events = json.loads((vectors / out).read_text())["uefi_event_logs"]
        assert len(log.events) == len(events)
        for number, (event, want) in enumerate(zip(log.events, events, strict=True), start=1):
            assert event.mr_index == want["index"], number
            assert event.type_name == want["type_name"], number
            assert event.data == base64.b64decode(want["event"]), number
            assert [(d.alg_id, d.digest.hex()) for d in event.digests] == [
                (ALG_NAMES[d["alg"]], d["digest"]) for d in want["digests"]
            ], number
            assert event.digest_matches_event() is want["digest_matches_event"], number
            aael = event.aael()
            if want["details"].get("unicode_name") == "AAEL":
                assert aael is not None
                assert aael.text == want["details"]["string"]
                data = want["details"]["data"]
                assert (aael.domain, aael.operation) == (data["domain"], data["operation"])
            else:
                assert aael is None

    def test_replay_equals_quote_rtmrs(self, vectors: Path) -> None:
        log = ccel.parse_event_log(read(vectors, COS))
        quote = tdx.parse_quote(read(vectors, "hw/tdx/ccel_gcp_cos113/quote_v4_padded8000.dat"))
        assert ccel.replay_rtmrs(log) == quote.body.rtmrs

    def test_trustee_ccel_data_does_not_belong_to_quote_4(self, vectors: Path) -> None:
        # trustee/SOURCES.md: its claims test pairs the two, but they come from different TDs.
        rtmrs = ccel.replay_rtmrs(ccel.parse_event_log(read(vectors, "trustee/tdx/CCEL_data")))
        quote = tdx.parse_quote(read(vectors, "trustee/tdx/tdx_quote_4.dat"))
        assert rtmrs[0].hex().startswith("2dc7")
        assert rtmrs[1].hex().startswith("0fa3")
        assert rtmrs[:2] != quote.body.rtmrs[:2]

    def test_gke_no_action_records_are_not_extended(self, vectors: Path) -> None:
        log = ccel.parse_event_log(read(vectors, GKE))
        assert [(e.mr_index, e.event_type) for e in log.events[:2]] == [(0, ccel.EV_NO_ACTION)] * 2
        assert b"SP800-155 Event3" in log.events[0].data
        rest = ccel.replay_rtmrs(log.events[2:])
        assert ccel.replay_rtmrs(log) == rest
        moved = [ccel.Event(mr_index=1, event_type=3, digests=e.digests, data=e.data) for e in log.events[:2]]
        assert ccel.replay_rtmrs([*moved, *log.events[2:]]) == rest

    def test_alibaba_aael_extends_rtmr3(self, vectors: Path) -> None:
        log = ccel.parse_event_log(read(vectors, ALIBABA))
        assert log.spec_id.mr_index == 1  # real data: the Spec ID record is not at MR index 0
        aael = [e for e in log.events if e.aael() is not None]
        assert [e.mr_index for e in aael] == [4] * len(aael)
        rtmr3 = bytes(48)
        for e in aael:
            digest = e.digest(TcgAlgorithm.SHA384)
            assert digest is not None
            rtmr3 = hashlib.sha384(rtmr3 + digest).digest()
        assert ccel.replay_rtmrs(log)[3] == rtmr3
        assert log.tail == ccel.END_MARKER

    def test_acpi_table(self, vectors: Path, expected: dict[str, Any]) -> None:
        data = read(vectors, "hw/tdx/ccel_gcp_cos113/ccel_acpi_table.bin")
        want = expected["tdx/ccel_gcp_cos113/ccel_acpi_table.bin"]
        table = ccel.parse_ccel_table(data)
        assert table.to_bytes() == data
        got = table.to_dict()
        for name in ("cc_subtype", "cc_type", "laml", "lasa", "oem_id", "oem_table_id", "revision"):
            assert got[name] == want[name], name
        assert table.laml == len(read(vectors, COS))


class TestTrim:
    def test_trim_at_ff_marker(self, vectors: Path, expected: dict[str, Any]) -> None:
        data = read(vectors, COS)
        trimmed = ccel.trim_ccel(data)
        assert trimmed == data[: expected["tdx/ccel_gcp_cos113/ccel_data.bin"]["log_end_offset"]]
        assert data[len(trimmed) :] == b"\xff" * (len(data) - len(trimmed))

    def test_trim_at_zero_marker(self, vectors: Path) -> None:
        data = read(vectors, "trustee/tdx/CCEL_data")
        trimmed = ccel.trim_ccel(data)
        assert not any(data[len(trimmed) :])

    def test_missing_marker(self, vectors: Path) -> None:
        log = ccel.trim_ccel(read(vectors, OVMF))
        message = f"CCEL end marker at 0x{len(log):x} is missing, expected 8 bytes of 0x00 or 0xff"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            ccel.trim_ccel(log)
        assert ccel.parse_event_log(log).tail == b""

    def test_short_uniform_tail(self, vectors: Path) -> None:
        log = ccel.trim_ccel(read(vectors, OVMF))
        assert ccel.parse_event_log(log + b"\xff" * 5).tail == b"\xff" * 5
        with pytest.raises(EvidenceParseError):
            ccel.parse_event_log(log + b"\xff\x00\xff")


class TestAael:
    def test_known_answers(self) -> None:
        event = AaelEvent(domain="domain", operation="operation", content="content")
        data = ccel.aael_event_data(event)
        assert data[:8].hex() == "4c45414118000000"
        assert hashlib.sha256(data).hexdigest() == "46df8dacf00a07d34a83cdf56d7978697790787cf2ba1432ef7c38f22cd96351"
        assert hashlib.sha384(data).hexdigest() == (
            "dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440fb00f3aa0609db7e49cd8d793f670d02"
        )
        entry = ccel.encode_aael_entry(event)
        assert entry[:12] == struct.pack("<III", 4, 6, 1)
        assert entry[12:14] == b"\x0c\x00"
        assert entry[14:62] == hashlib.sha384(data).digest()
        assert entry[62:66] == struct.pack("<I", len(data))
        assert entry[66:] == data
        sha256 = ccel.encode_aael_entry(event, alg=TcgAlgorithm.SHA256, mr_index=2)
        assert sha256[:14] == struct.pack("<IIIH", 2, 6, 1, 0x0B)
        assert sha256[14:46].hex() == "46df8dacf00a07d34a83cdf56d7978697790787cf2ba1432ef7c38f22cd96351"

    def test_alibaba_entry_known_answer(self, vectors: Path) -> None:
        event = AaelEvent(domain="coco.com", operation="some-operation", content="some-content")
        entry = ccel.encode_aael_entry(event)
        assert entry[14:62].hex() == (
            "2330183d89750c6a374ac9827d33a33636e7876733544584c8ccc88df0df87eada37e5d71d0773502234c2b5fbc7448e"
        )
        assert entry in read(vectors, ALIBABA)

    def test_parse_round_trip(self) -> None:
        event = AaelEvent(domain="github.com/confidential-containers", operation="PullImage", content='{"a": "b c"}')
        assert ccel.parse_aael_event(ccel.aael_event_data(event)) == event

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"LEAA", "AAEL event length is 0x4, expected at least 0x8"),
            (b"LEAB\x00\x00\x00\x00", "tagged event id is 0x4241454c, expected 0x4141454c (AAEL)"),
            (b"LEAA\x04\x00\x00\x00a b c", "AAEL text length is 0x4, expected 0x5"),
            (b"LEAA\x03\x00\x00\x00a b", "AAEL text is 'a b', expected '<domain> <operation> <content>'"),
            (b"LEAA\x05\x00\x00\x00a b \xff", "AAEL text byte at 0xc is not UTF-8, expected UTF-8 text"),
            (b"LEAA\x06\x00\x00\x00a b c\n", "AAEL text is invalid: `content` contains a newline"),
        ],
    )
    def test_bad_events(self, data: bytes, message: str) -> None:
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            ccel.parse_aael_event(data)

    @pytest.mark.parametrize(
        ("domain", "operation", "content"),
        [("a b", "op", "c"), ("", "op", "c"), ("d", "o p", "c"), ("d", "o", "x\ny"), ("d", "o", "\ud800")],
    )
    def test_invalid_event_text(self, domain: str, operation: str, content: str) -> None:
        with pytest.raises(ValueError, match="expected"):
            AaelEvent(domain=domain, operation=operation, content=content)


class TestCcEventlog:
    def test_no_ccel_header_is_guest_components_bytes(self) -> None:
        assert len(ccel.NO_CCEL_HEADER) == 69
        assert ccel.NO_CCEL_HEADER.hex() == GC_HEADER_HEX
        log = ccel.parse_event_log(ccel.NO_CCEL_HEADER)
        assert log.events == ()
        assert [a.alg_id for a in log.spec_id.algorithms] == [TcgAlgorithm.SHA384, TcgAlgorithm.SM3_256]

    def test_neither(self) -> None:
        assert ccel.build_cc_eventlog(None, None) is None

    def test_only_aael(self) -> None:
        entries = b"".join(
            ccel.encode_aael_entry(AaelEvent(domain="d", operation=f"op{i}", content="c")) for i in range(3)
        )
        out = ccel.build_cc_eventlog(None, entries)
        assert out == ccel.NO_CCEL_HEADER + entries + b"\xff" * 8
        log = ccel.parse_event_log(out)
        assert len(log.events) == 3
        assert ccel.replay_rtmrs(log)[:3] == (bytes(48),) * 3
        assert ccel.build_cc_eventlog(None, b"") == ccel.NO_CCEL_HEADER + b"\xff" * 8

    def test_only_ccel(self, vectors: Path) -> None:
        data = read(vectors, COS)
        assert ccel.build_cc_eventlog(data, None) == ccel.trim_ccel(data) + b"\xff" * 8

    def test_reproduces_alibaba_layout(self, vectors: Path) -> None:
        data = read(vectors, ALIBABA)
        log = ccel.parse_event_log(data)
        firmware = [e for e in log.events if e.aael() is None]
        aael = [e for e in log.events if e.aael() is not None]
        assert log.events == (*firmware, *aael)
        raw_ccel = log.spec_id.to_bytes() + b"".join(e.to_bytes() for e in firmware) + b"\xff" * 4096
        entries = b"".join(
            ccel.encode_aael_entry(e.aael() or AaelEvent(domain="x", operation="x", content="")) for e in aael
        )
        assert ccel.build_cc_eventlog(raw_ccel, entries) == data

    def test_rejects_entries_that_do_not_parse(self, vectors: Path) -> None:
        sha512 = ccel.encode_aael_entry(AaelEvent(domain="d", operation="o", content="c"), alg=TcgAlgorithm.SHA512)
        with pytest.raises(EvidenceParseError, match=re.escape("event 1 digest algorithm is SHA-512, expected one of")):
            ccel.build_cc_eventlog(None, sha512)
        with pytest.raises(EvidenceParseError, match=re.escape("AAEL entries end at")):
            ccel.build_cc_eventlog(None, b"\xff" * 8 + b"junk")


def _spec(data: bytes) -> bytes:
    """The Spec ID record of a log."""
    size = struct.unpack_from("<I", data, 28)[0]
    return data[: 32 + size]


class TestStrictness:
    @pytest.mark.parametrize(
        ("offset", "value", "message"),
        [
            (4, b"\x01", "first event `event_type` is 0x1, expected 0x3 (EV_NO_ACTION Spec ID event)"),
            (8, b"\x01", "Spec ID event digest byte at 0x8 is 0x01, expected 0x00"),
            (27, b"\x07", "Spec ID event digest byte at 0x1b is 0x07, expected 0x00"),
            (32, b"X", "Spec ID `signature` is b'Xpec ID Event03\\x00', expected b'Spec ID Event03\\x00'"),
            (56, b"\x00", "Spec ID `numberOfAlgorithms` is 0, expected 1..1 (event size 0x21)"),
            (56, b"\x02", "Spec ID `numberOfAlgorithms` is 2, expected 1..1 (event size 0x21)"),
            (62, b"\x20", "digest size of SHA-384 is 0x20, expected 0x30"),
            (60, b"\x99", "Spec ID event size is 0x21, expected"),  # unknown alg 0x99 with size 48 is fine ...
            (64, b"\x01", "Spec ID event size is 0x21, expected 0x22 (vendorInfoSize 0x1)"),
            (28, b"\xff\xff", "Spec ID event data at 0x20 needs 0xffff bytes, expected at least 0x1001f bytes of log"),
        ],
    )
    def test_spec_id(self, vectors: Path, offset: int, value: bytes, message: str) -> None:
        data = read(vectors, OVMF)
        if offset == 60:  # ... so check that the events then fail on the undeclared SHA-384
            message = "event 1 digest algorithm is SHA-384, expected one of 0x0099"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            ccel.parse_event_log(put(data, offset, value))

    def test_spec_id_zero_signature_allowed(self, vectors: Path) -> None:
        data = put(read(vectors, OVMF), 32, bytes(16))
        assert ccel.parse_event_log(data).spec_id.signature == bytes(16)

    @pytest.mark.parametrize(
        ("rel_offset", "value", "message"),
        [
            (8, b"\x00", "event 1 digest count is 0, expected 1..1"),
            (8, b"\x02", "event 1 digest count is 2, expected 1..1"),
            (12, b"\x0b", "event 1 digest algorithm is SHA-256, expected one of SHA-384"),
            (
                62,
                b"\xff\xff\xff\x00",
                "event 1 data at 0x83 needs 0xffffff bytes, expected at least 0x1000082 bytes of log",
            ),
        ],
    )
    def test_event2(self, vectors: Path, rel_offset: int, value: bytes, message: str) -> None:
        data = read(vectors, OVMF)
        start = len(_spec(data))
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            ccel.parse_event_log(put(data, start + rel_offset, value))

    def test_truncations(self, vectors: Path) -> None:
        log = ccel.trim_ccel(read(vectors, OVMF))
        for cut in (0, 4, 31, 32, 40, 64, 66, 70, 77, 130, len(log) - 1):
            with pytest.raises(EvidenceParseError):
                ccel.parse_event_log(log[:cut])
        assert ccel.parse_event_log(log[:65]).events == ()  # the Spec ID record alone is a valid, empty log

    def test_replay_errors(self) -> None:
        digest = (ccel.Digest(alg_id=TcgAlgorithm.SHA384, digest=bytes(48)),)
        with pytest.raises(EvidenceParseError, match=re.escape("event 1 MR index is 5, expected 0..4")):
            ccel.replay_rtmrs([ccel.Event(mr_index=5, event_type=6, digests=digest, data=b"")])
        sha256 = (ccel.Digest(alg_id=TcgAlgorithm.SHA256, digest=bytes(32)),)
        message = "event 1 SHA-384 digest is missing, expected one to extend RTMR1"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            ccel.replay_rtmrs([ccel.Event(mr_index=2, event_type=6, digests=sha256, data=b"")])
        assert ccel.replay_rtmrs([ccel.Event(mr_index=0, event_type=6, digests=sha256, data=b"")]) == (bytes(48),) * 4

    def test_replay_single_extend(self) -> None:
        digest = hashlib.sha384(b"x").digest()
        event = ccel.Event(
            mr_index=4, event_type=6, digests=(ccel.Digest(alg_id=TcgAlgorithm.SHA384, digest=digest),), data=b"x"
        )
        assert ccel.replay_rtmrs([event])[3] == hashlib.sha384(bytes(48) + digest).digest()

    @pytest.mark.parametrize(
        ("offset", "value", "message"),
        [
            (0, b"XCEL", "ACPI table signature is b'XCEL', expected b'CCEL'"),
            (4, b"\x39", "ACPI header `Length` is 0x39, expected 0x38"),
            (9, b"\x00", "ACPI checksum sum is"),
            (36, b"\x05", "CCEL `CC Type` is 5, expected 1 (SEV) or 2 (TDX)"),
            (38, b"\x01", "CCEL reserved field at 0x26 is 0100, expected 0000"),
        ],
    )
    def test_acpi_table(self, vectors: Path, offset: int, value: bytes, message: str) -> None:
        data = put(read(vectors, "hw/tdx/ccel_gcp_cos113/ccel_acpi_table.bin"), offset, value)
        if offset != 9:  # keep the checksum valid so the field check is reached
            data = put(data, 9, bytes(((data[9] - sum(data)) & 0xFF,)))
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            ccel.parse_ccel_table(data)
        with pytest.raises(EvidenceParseError, match=re.escape("CCEL table length is 0x37, expected 0x38")):
            ccel.parse_ccel_table(data[:55])


NO_SURROGATES: list[Literal["Cs"]] = ["Cs"]
WORD = st.text(st.characters(blacklist_characters=" \n", blacklist_categories=NO_SURROGATES), min_size=1, max_size=10)
CONTENT = st.text(st.characters(blacklist_characters="\n", blacklist_categories=NO_SURROGATES), max_size=30)
PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _log_or_error(data: bytes) -> None:
    try:
        log = ccel.parse_event_log(data)
    except EvidenceParseError:
        return
    assert log.to_bytes() == data
    json.dumps(log.to_dict())
    with contextlib.suppress(EvidenceParseError):
        ccel.replay_rtmrs(log)


class TestProperties:
    @PROP
    @given(data=st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        _log_or_error(data)

    @PROP
    @given(rest=st.binary(max_size=400))
    def test_random_events_after_valid_header(self, rest: bytes) -> None:
        _log_or_error(ccel.NO_CCEL_HEADER + rest)

    @PROP
    @given(st.data())
    def test_mutated_real_log(self, vectors: Path, data: st.DataObject) -> None:
        raw = bytearray(read(vectors, ALIBABA))
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        _log_or_error(bytes(raw[: data.draw(st.integers(0, len(raw)))]))

    @PROP
    @given(events=st.lists(st.tuples(WORD, WORD, CONTENT), max_size=4))
    def test_aael_entries_round_trip(self, events: list[tuple[str, str, str]]) -> None:
        items = [AaelEvent(domain=d, operation=o, content=c) for d, o, c in events]
        out = ccel.build_cc_eventlog(None, b"".join(ccel.encode_aael_entry(e) for e in items))
        assert out is not None
        log = ccel.parse_event_log(out)
        assert [e.aael() for e in log.events] == items
        assert all(e.digest_matches_event() for e in log.events)
