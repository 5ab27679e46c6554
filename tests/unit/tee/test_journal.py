"""The event-log journal: extends, the write-ahead record, recovery from every crash state, refusals, concurrency."""

from __future__ import annotations

import errno
import hashlib
import re
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DeviceError, EvidenceParseError, MeasurementError
from agent.tee import ccel, eventlog
from agent.tee.journal import Journal, WalRecord, decode_wal, encode_wal

ZERO = bytes(48)


class FakeRtmrs:
    """Four in-memory RTMRs with the kernel's extend rule (computed here independently) and failure switches."""

    def __init__(self) -> None:
        self.values = [ZERO] * 4
        self.writes: list[tuple[int, bytes]] = []
        self.fail_errno = 0
        self.fail_after_extend = False  # the write errors although the register was extended (EINTR late)
        self.lock = threading.Lock()

    def read(self, rtmr: int) -> bytes:
        return self.values[rtmr]

    def extend(self, rtmr: int, data: bytes) -> None:
        assert len(data) == 48
        with self.lock:
            if self.fail_errno and not self.fail_after_extend:
                raise DeviceError("extend failed", errno=self.fail_errno)
            self.writes.append((rtmr, data))
            self.values[rtmr] = hashlib.sha384(self.values[rtmr] + data).digest()
            if self.fail_errno:
                raise DeviceError("extend failed", errno=self.fail_errno)


def entry(text: str = "c", rtmr: int = 3) -> ccel.Event:
    return eventlog.measurement_entry("d", "o", text, rtmr=rtmr)


def agree(path: Path, registers: FakeRtmrs) -> bool:
    events = eventlog.parse_agent_log(path.read_bytes())
    return eventlog.replay(eventlog.items((), events), registers.values).ok


@pytest.fixture
def registers() -> FakeRtmrs:
    return FakeRtmrs()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "attestation-agent" / "eventlog"


def opened(log_path: Path, registers: FakeRtmrs) -> Journal:
    journal = Journal(log_path, registers)
    journal.open()
    return journal


class TestExtend:
    def test_extend_logs_and_extends(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        first, second = entry("one"), entry("two", rtmr=1)
        journal.extend(first)
        journal.extend(second)
        assert log_path.read_bytes() == first.to_bytes() + second.to_bytes()
        assert journal.log_bytes() == log_path.read_bytes()
        assert registers.writes == [(3, first.digests[0].digest), (1, second.digests[0].digest)]
        assert agree(log_path, registers)
        assert not journal.wal_path.exists()
        assert journal.entries == 2
        journal.close()

    def test_modes(self, log_path: Path, registers: FakeRtmrs) -> None:
        opened(log_path, registers).close()
        assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(log_path.parent.stat().st_mode) == 0o700

    def test_loose_mode_is_tightened(self, log_path: Path, registers: FakeRtmrs) -> None:
        log_path.parent.mkdir(parents=True)
        log_path.touch(mode=0o644)
        log_path.chmod(0o644)
        opened(log_path, registers).close()
        assert stat.S_IMODE(log_path.stat().st_mode) == 0o600

    def test_failed_write_leaves_nothing(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        registers.fail_errno = errno.EINVAL
        with pytest.raises(DeviceError, match="extend failed"):
            journal.extend(entry())
        assert log_path.read_bytes() == b""
        assert not journal.wal_path.exists()
        registers.fail_errno = 0
        journal.extend(entry())  # still usable
        assert agree(log_path, registers)

    def test_error_after_the_extend_took_effect_is_logged(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        registers.fail_errno, registers.fail_after_extend = errno.EINTR, True
        journal.extend(entry())
        assert agree(log_path, registers)
        assert len(eventlog.parse_agent_log(log_path.read_bytes())) == 1

    def test_register_changed_by_someone_else_during_a_failed_extend(
        self, log_path: Path, registers: FakeRtmrs
    ) -> None:
        journal = opened(log_path, registers)

        def clobber(rtmr: int, data: bytes) -> None:
            registers.values[rtmr] = b"\x07" * 48
            raise DeviceError("extend failed", errno=errno.EIO)

        registers.extend = clobber  # type: ignore[method-assign]
        with pytest.raises(MeasurementError, match="runtime measurement is stopped") as info:
            journal.extend(entry())
        assert "RTMR3 is 0707" in str(info.value.__cause__)
        with pytest.raises(MeasurementError, match="runtime measurement is stopped"):
            journal.extend(entry())
        assert journal.wal_path.exists()  # kept for the restart, which will refuse with the reason

    def test_lock_excludes_a_second_agent(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        with pytest.raises(MeasurementError, match="is locked by another process"):
            Journal(log_path, registers).open()
        journal.close()
        Journal(log_path, registers).open()

    def test_concurrent_extends_are_serialised(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)

        def caller(n: int) -> None:
            for i in range(25):
                journal.extend(entry(f"{n}-{i}", rtmr=n % 4))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        events = eventlog.parse_agent_log(log_path.read_bytes())
        assert len(events) == 200
        assert agree(log_path, registers)
        # each register's writes are in log order
        for rtmr in range(4):
            logged = [e.digests[0].digest for e in events if e.mr_index == rtmr + 1]
            assert logged == [d for r, d in registers.writes if r == rtmr]

    def test_run_locked(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        journal.extend(entry())
        value, log = journal.run_locked(lambda: registers.values[3])
        assert eventlog.replay(eventlog.items((), eventlog.parse_agent_log(log)), [ZERO, ZERO, ZERO, value]).ok


def pending_state(log_path: Path, registers: FakeRtmrs, *, extended: bool, written: int) -> tuple[ccel.Event, Journal]:
    """The files and register a crash leaves during an extend: WAL in place, register extended or not, and
    `written` bytes of the entry already in the log."""
    journal = opened(log_path, registers)
    journal.extend(entry("first"))
    journal.close()
    pending = entry("pending")
    data = pending.to_bytes()
    before = registers.values[3]
    after = eventlog.extended(before, pending.digests[0].digest)
    offset = log_path.stat().st_size
    journal.wal_path.write_bytes(encode_wal(WalRecord(offset=offset, rtmr=3, before=before, after=after, entry=data)))
    if extended:
        registers.values[3] = after
    with log_path.open("ab") as out:
        out.write(data[:written])
    return pending, Journal(log_path, registers)


class TestRecovery:
    @pytest.mark.parametrize("written", [0, 5, 200])
    def test_not_extended_is_discarded(self, log_path: Path, registers: FakeRtmrs, written: int) -> None:
        _pending, journal = pending_state(log_path, registers, extended=False, written=written)
        recovery = journal.open()
        assert (recovery.pending, recovery.entries) == ("discarded", 1)
        assert len(eventlog.parse_agent_log(log_path.read_bytes())) == 1
        assert agree(log_path, registers)
        assert not journal.wal_path.exists()

    @pytest.mark.parametrize("written", [0, 5, 200])
    def test_extended_is_completed(self, log_path: Path, registers: FakeRtmrs, written: int) -> None:
        pending, journal = pending_state(log_path, registers, extended=True, written=written)
        recovery = journal.open()
        assert (recovery.pending, recovery.entries) == ("completed", 2)
        assert eventlog.parse_agent_log(log_path.read_bytes())[-1] == pending
        assert agree(log_path, registers)
        journal.extend(entry("after"))
        assert agree(log_path, registers)

    def test_unrenamed_wal_is_ignored(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        journal.close()
        torn = log_path.with_name(".eventlog.wal.tmp")
        torn.write_bytes(b"CVMAAWAL\x01")
        assert Journal(log_path, registers).open().pending == "none"
        assert not torn.exists()

    def test_register_moved_elsewhere(self, log_path: Path, registers: FakeRtmrs) -> None:
        _pending, journal = pending_state(log_path, registers, extended=False, written=0)
        registers.values[3] = b"\x05" * 48
        with pytest.raises(MeasurementError, match=re.escape("RTMR3 is 0505")) as info:
            journal.open()
        assert "something else extended the register" in str(info.value)
        assert journal.wal_path.exists()

    def test_corrupt_wal(self, log_path: Path, registers: FakeRtmrs) -> None:
        _pending, journal = pending_state(log_path, registers, extended=True, written=0)
        raw = bytearray(journal.wal_path.read_bytes())
        raw[20] ^= 1
        journal.wal_path.write_bytes(bytes(raw))
        with pytest.raises(MeasurementError, match=r"is unreadable .*checksum does not match"):
            journal.open()

    def test_log_shorter_than_the_pending_offset(self, log_path: Path, registers: FakeRtmrs) -> None:
        _pending, journal = pending_state(log_path, registers, extended=True, written=0)
        log_path.write_bytes(b"")
        with pytest.raises(MeasurementError, match="entries were lost"):
            journal.open()

    def test_log_that_does_not_replay(self, log_path: Path, registers: FakeRtmrs) -> None:
        journal = opened(log_path, registers)
        journal.extend(entry("one"))
        journal.extend(entry("two"))
        journal.close()
        registers.values[3] = eventlog.extended(ZERO, entry("one").digests[0].digest)  # "two" never reached it
        with pytest.raises(MeasurementError, match=re.escape("entry 2 (agent, 'd o two'): logged but not in RTMR3")):
            Journal(log_path, registers).open()

    def test_log_replayed_over_firmware_events(self, log_path: Path, registers: FakeRtmrs) -> None:
        firmware = [entry("firmware", rtmr=0)]
        registers.values[0] = eventlog.extended(ZERO, firmware[0].digests[0].digest)
        journal = Journal(log_path, registers, firmware=firmware)
        journal.open()
        journal.extend(entry("agent", rtmr=0))
        journal.close()
        again = Journal(log_path, registers, firmware=firmware)
        assert again.open().entries == 1
        again.close()
        with pytest.raises(MeasurementError, match="does not replay"):
            Journal(log_path, registers).open()  # without the firmware event RTMR0 cannot be explained

    def test_unparsable_log(self, log_path: Path, registers: FakeRtmrs) -> None:
        log_path.parent.mkdir(parents=True)
        log_path.write_bytes(entry().to_bytes()[:30])
        with pytest.raises(MeasurementError, match="does not parse"):
            Journal(log_path, registers).open()


class TestWalFormat:
    def test_round_trip(self) -> None:
        record = WalRecord(offset=2**40, rtmr=2, before=b"\x01" * 48, after=b"\x02" * 48, entry=b"entry")
        assert decode_wal(encode_wal(record)) == record

    def test_oversized(self) -> None:
        data = encode_wal(WalRecord(offset=0, rtmr=3, before=ZERO, after=ZERO, entry=b"x" * 70_000))
        with pytest.raises(EvidenceParseError, match="expected one entry"):
            decode_wal(data)

    def test_truncated(self) -> None:
        data = encode_wal(WalRecord(offset=0, rtmr=3, before=ZERO, after=ZERO, entry=b"x"))
        for cut in (0, 10, len(data) - 1):
            with pytest.raises(EvidenceParseError):
                decode_wal(data[:cut])

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes_never_decode(self, data: bytes) -> None:
        with pytest.raises(EvidenceParseError):
            decode_wal(data)

    @settings(max_examples=100, deadline=None)
    @given(st.integers(0, 2**64 - 1), st.integers(0, 3), st.binary(max_size=100), st.integers(0, 10_000))
    def test_any_flip_is_detected(self, offset: int, rtmr: int, body: bytes, position: int) -> None:
        data = bytearray(encode_wal(WalRecord(offset=offset, rtmr=rtmr, before=ZERO, after=ZERO, entry=body)))
        data[position % len(data)] ^= 0x40
        with pytest.raises(EvidenceParseError):
            decode_wal(bytes(data))


def test_no_file_descriptor_leaks(log_path: Path, registers: FakeRtmrs) -> None:
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(5):
        journal = opened(log_path, registers)
        journal.extend(entry())
        journal.close()
    assert len(list(Path("/proc/self/fd").iterdir())) == before
