"""Runtime-measurement entries, the PCR → RTMR map, the extend rule, and replay naming the first divergent entry."""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import EvidenceParseError
from agent.tee import ccel, eventlog, tdx
from tests.unit.tee.vectorutil import read

ALIBABA = "trustee/eventlog/CCEL_AAEL_alibabacloud"
GCP = "hw/tdx/ccel_gcp_cos113"
SHA384_KA = "dad5f0e226318ffa9839b75a472c6aa7fdb5834949d0a0a22990cf04d5692440fb00f3aa0609db7e49cd8d793f670d02"
ALIBABA_KA = "2330183d89750c6a374ac9827d33a33636e7876733544584c8ccc88df0df87eada37e5d71d0773502234c2b5fbc7448e"
ZERO = bytes(48)


def independent_extend(register: bytes, digest: bytes) -> bytes:
    """RTMR' = SHA-384(RTMR || digest padded to 48), written out again here."""
    return hashlib.sha384(register + (digest + bytes(48))[:48]).digest()


class TestEntry:
    def test_known_answer_sha384(self) -> None:
        entry = eventlog.measurement_entry("domain", "operation", "content", rtmr=3)
        raw = entry.to_bytes()
        text = b"domain operation content"
        assert raw == (
            struct.pack("<IIIH", 4, 6, 1, 0x000C)
            + bytes.fromhex(SHA384_KA)
            + struct.pack("<I", 8 + len(text))
            + bytes.fromhex("4c45414118000000")
            + text
        )

    def test_known_answer_sha256(self) -> None:
        entry = eventlog.measurement_entry("domain", "operation", "content", rtmr=0, alg=ccel.TcgAlgorithm.SHA256)
        assert entry.mr_index == 1
        assert entry.digests[0].digest.hex() == "46df8dacf00a07d34a83cdf56d7978697790787cf2ba1432ef7c38f22cd96351"

    def test_alibaba_entry_is_in_the_vector(self, vectors: Path) -> None:
        entry = eventlog.measurement_entry("coco.com", "some-operation", "some-content", rtmr=3)
        assert entry.digests[0].digest.hex() == ALIBABA_KA
        assert entry.to_bytes() in read(vectors, ALIBABA)

    def test_digest_is_over_the_tagged_event_not_the_text(self) -> None:
        entry = eventlog.measurement_entry("d", "o", "c", rtmr=3)
        assert entry.digests[0].digest == hashlib.sha384(b"LEAA\x05\x00\x00\x00d o c").digest()
        assert entry.digests[0].digest != hashlib.sha384(b"d o c").digest()

    @pytest.mark.parametrize(
        ("domain", "operation", "content", "message"),
        [
            ("a b", "o", "c", "`domain` is 'a b'"),
            ("d", "", "c", "`operation` is ''"),
            ("d", "o", "x\ny", "`content` contains a newline"),
            ("d", "o", "x" * (64 * 1024), "event text is 65540 bytes, expected at most 65536"),
        ],
    )
    def test_rejects_text_the_format_cannot_carry(
        self, domain: str, operation: str, content: str, message: str
    ) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            eventlog.measurement_entry(domain, operation, content, rtmr=3)

    def test_rejects_register(self) -> None:
        with pytest.raises(ValueError, match=re.escape("`rtmr` is 4, expected 0..3")):
            eventlog.measurement_entry("d", "o", "c", rtmr=4)


class TestRegisterMap:
    @pytest.mark.parametrize(
        ("pcr", "cc_mr"),
        [(0, 4), (1, 1), (7, 1), (2, 2), (6, 2), (8, 3), (15, 3), (16, 4), (17, 4), (23, 4)],
    )
    def test_reference_table(self, pcr: int, cc_mr: int) -> None:
        assert eventlog.cc_mr_for_pcr(pcr) == cc_mr
        assert eventlog.rtmr_for_pcr(pcr) == cc_mr - 1

    def test_every_pcr(self) -> None:
        table = [eventlog.rtmr_for_pcr(p) for p in range(24)]
        assert table == [3, 0, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]

    @pytest.mark.parametrize("pcr", [-1, 24, 2**64 - 1])
    def test_out_of_range(self, pcr: int) -> None:
        with pytest.raises(ValueError, match=re.escape(f"PCR index is {pcr}, expected 0..23")):
            eventlog.cc_mr_for_pcr(pcr)


class TestExtend:
    def test_pad_and_truncate(self) -> None:
        assert eventlog.extend_data(b"\x01" * 32) == b"\x01" * 32 + bytes(16)
        assert eventlog.extend_data(b"\x02" * 64) == b"\x02" * 48
        assert eventlog.extend_data(b"\x03" * 48) == b"\x03" * 48

    def test_known_value(self) -> None:
        digest = bytes.fromhex(SHA384_KA)
        assert eventlog.extended(ZERO, digest) == hashlib.sha384(ZERO + digest).digest()

    def test_register_size(self) -> None:
        with pytest.raises(ValueError, match="register is 47 bytes"):
            eventlog.extended(bytes(47), ZERO)


class TestAgentLog:
    def test_round_trip(self) -> None:
        entries = [eventlog.measurement_entry("d", "o", f"c{i}", rtmr=i % 4) for i in range(5)]
        data = b"".join(e.to_bytes() for e in entries)
        assert eventlog.parse_agent_log(data) == tuple(entries)
        assert eventlog.parse_agent_log(b"") == ()

    def test_partial_entry(self) -> None:
        data = eventlog.measurement_entry("d", "o", "c", rtmr=3).to_bytes()
        with pytest.raises(EvidenceParseError, match="event 2 header"):
            eventlog.parse_agent_log(data + data[:5])

    def test_trailing_padding(self) -> None:
        data = eventlog.measurement_entry("d", "o", "c", rtmr=3).to_bytes()
        with pytest.raises(EvidenceParseError, match="agent event log has 0x8 bytes after its last entry at 0x4f"):
            eventlog.parse_agent_log(data + b"\xff" * 8)


class TestReplay:
    def test_real_ccel_and_aael_vector(self, vectors: Path) -> None:
        items = eventlog.items_from_cc_eventlog(read(vectors, ALIBABA))
        assert [i.number for i in items if i.source == "agent"] == [86, 87]
        report = eventlog.replay(items, ccel.replay_rtmrs(ccel.parse_event_log(read(vectors, ALIBABA))))
        assert report.ok
        assert [r.entries for r in report.registers] == [13, 14, 58, 2]

    def test_vector_register_missing_the_last_aael_extend(self, vectors: Path) -> None:
        items = eventlog.items_from_cc_eventlog(read(vectors, ALIBABA))
        actual = list(ccel.replay_rtmrs(ccel.parse_event_log(read(vectors, ALIBABA))))
        actual[3] = independent_extend(ZERO, items[85].event.digests[0].digest)  # only entry 86 was extended
        report = eventlog.replay(items, actual)
        assert report.divergence is not None
        assert report.divergence.item is items[86]
        assert report.divergence.describe() == (
            "entry 87 (agent, 'coco.com some-operation "
            '{"key": "value", "nested-key": {"sub-key": "value"}}\'): '
            "logged but not in RTMR3, which equals the replay of the 1 entries before it"
        )

    def test_vector_tampered_aael_text(self, vectors: Path) -> None:
        data = read(vectors, ALIBABA)
        actual = ccel.replay_rtmrs(ccel.parse_event_log(data))
        tampered = data.replace(b"some-content", b"evil-content")
        report = eventlog.replay(eventlog.items_from_cc_eventlog(tampered), actual)
        assert report.divergence is not None
        assert report.divergence.item is not None
        assert report.divergence.item.number == 86
        assert report.divergence.reason == "its digest is not H(event data)"
        assert all(r.matches for r in report.registers)  # the digests still replay: only the check catches it

    def test_firmware_then_agent_against_quote(self, vectors: Path) -> None:
        firmware = ccel.parse_event_log(read(vectors, f"{GCP}/ccel_data.bin")).events
        quote = tdx.parse_quote(read(vectors, f"{GCP}/quote_v4_padded8000.dat"))
        agent = [eventlog.measurement_entry("d", "o", f"c{i}", rtmr=3) for i in range(3)]
        rtmr3 = ZERO
        for entry in agent:
            rtmr3 = independent_extend(rtmr3, entry.digests[0].digest)
        actual = (*quote.body.rtmrs[:3], rtmr3)
        report = eventlog.replay(eventlog.items(firmware, agent), actual)
        assert report.ok, report.to_dict()
        # the quote itself (RTMR3 = 0) does not hold the agent's entries: the first one is named
        report = eventlog.replay(eventlog.items(firmware, agent), quote.body.rtmrs)
        assert report.divergence is not None
        assert report.divergence.item is not None
        assert (report.divergence.item.number, report.divergence.item.source) == (len(firmware) + 1, "agent")

    def test_unexplained_extend(self) -> None:
        agent = [eventlog.measurement_entry("d", "o", "c", rtmr=3)]
        stray = independent_extend(independent_extend(ZERO, agent[0].digests[0].digest), b"\x01" * 48)
        report = eventlog.replay(eventlog.items((), agent), (ZERO, ZERO, ZERO, stray))
        assert report.divergence is not None
        assert report.divergence.item is not None
        assert report.divergence.item.number == 1
        assert "no prefix of its 1 log entries replays to" in report.divergence.reason

    def test_register_without_entries(self) -> None:
        report = eventlog.replay((), (ZERO, ZERO, b"\x01" * 48, ZERO))
        assert report.divergence is not None
        assert report.divergence.item is None
        assert report.divergence.describe().startswith("before the first RTMR2 entry: RTMR2 is 0101")

    def test_only_judged_registers(self) -> None:
        report = eventlog.replay((), (b"\x01" * 48, ZERO, ZERO, ZERO), registers={3})
        assert report.ok
        assert [r.rtmr for r in report.registers] == [3]

    def test_unreplayable_event(self) -> None:
        bad = ccel.Event(mr_index=5, event_type=6, digests=(ccel.Digest(alg_id=0x0C, digest=ZERO),), data=b"")
        with pytest.raises(EvidenceParseError, match=re.escape("entry 1 (agent, EV_EVENT_TAG) MR index is 5")):
            eventlog.replay(eventlog.items((), [bad]), (ZERO,) * 4)


NO_SURROGATES: list[Literal["Cs"]] = ["Cs"]
EVENTS = st.lists(
    st.tuples(
        st.text(st.characters(blacklist_characters=" \n", blacklist_categories=NO_SURROGATES), min_size=1, max_size=8),
        st.text(st.characters(blacklist_characters=" \n", blacklist_categories=NO_SURROGATES), min_size=1, max_size=8),
        st.text(st.characters(blacklist_characters="\n", blacklist_categories=NO_SURROGATES), max_size=30),
        st.integers(0, 23),
    ),
    min_size=1,
    max_size=12,
)


class TestProperties:
    @settings(max_examples=60, deadline=None)
    @given(EVENTS)
    def test_log_replays_to_independently_extended_registers(self, events: list[tuple[str, str, str, int]]) -> None:
        registers = [ZERO] * 4
        entries = []
        for domain, operation, content, pcr in events:
            entry = eventlog.measurement_entry(domain, operation, content, rtmr=eventlog.rtmr_for_pcr(pcr))
            text = f"{domain} {operation} {content}".encode()
            digest = hashlib.sha384(struct.pack("<II", 0x4141454C, len(text)) + text).digest()
            assert entry.digests[0].digest == digest
            registers[entry.mr_index - 1] = independent_extend(registers[entry.mr_index - 1], digest)
            entries.append(entry)
        data = b"".join(e.to_bytes() for e in entries)
        parsed = eventlog.parse_agent_log(data)
        assert eventlog.replay(eventlog.items((), parsed), registers).ok

    @settings(max_examples=60, deadline=None)
    @given(EVENTS, st.data())
    def test_a_missing_extend_is_named_no_later_than_its_entry(
        self, events: list[tuple[str, str, str, int]], data: st.DataObject
    ) -> None:
        entries = [  # distinct texts: two equal entries cannot be told apart by a register
            eventlog.measurement_entry(d, o, f"{i} {c}", rtmr=eventlog.rtmr_for_pcr(p))
            for i, (d, o, c, p) in enumerate(events)
        ]
        skip = data.draw(st.integers(0, len(entries) - 1))
        registers = [ZERO] * 4
        for i, entry in enumerate(entries):
            if i != skip:
                registers[entry.mr_index - 1] = independent_extend(
                    registers[entry.mr_index - 1], entry.digests[0].digest
                )
        report = eventlog.replay(eventlog.items((), entries), registers)
        assert report.divergence is not None
        assert report.divergence.item is not None
        assert report.divergence.item.number <= skip + 1
        assert report.divergence.rtmr == entries[skip].mr_index - 1
        if all(e.mr_index != entries[skip].mr_index for e in entries[skip + 1 :]):
            assert report.divergence.item.number == skip + 1  # the register's last entry: named exactly
