"""The runtime event log file, its write-ahead journal, and crash-safe register extends. Edge (files).

Files (the log path defaults to the reference's `/run/attestation-agent/eventlog`):

- `<log>`: the agent's entries, concatenated `TCG_PCR_EVENT2` records (exactly what is appended to the CCEL in
  `cc_eventlog`), mode 0600 in a 0700 directory when created here. Held with an exclusive `flock` while the
  journal is open, so two agents cannot write one log.
- `<dir>/.<log name>.wal`: at most one pending record, written before the register is touched.

One extend (serialised by a lock; evidence generation takes the same lock, so a quote never sees a register
whose entry is not yet in the log):

1. read the register (`before`) and compute `after` = SHA-384(before ‖ digest padded to 48);
2. write the WAL record {log offset, register, before, after, entry} to a temporary file, fsync, rename, fsync
   the directory;
3. extend the register;
4. write the entry at the recorded offset, fsync the log;
5. remove the WAL, fsync the directory.

Recovery at open, when a WAL record exists: the live register decides. `after` → the extend happened, the entry
is (re)written at its offset (completed); `before` → it did not, the entry is dropped (discarded: its caller never
got an answer); anything else, an unreadable record, or a log shorter than the recorded offset → the journal
refuses to open (`MeasurementError`, with the reason). Then every register the log has entries for must equal the
replay of firmware events + log entries, else it refuses, naming the first entry that diverges.
So across `kill -9` at any instant there is neither a lost entry nor an extend without one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol, TypeVar

from agent.errors import DeviceError, EvidenceParseError, MeasurementError
from agent.tee import ccel, eventlog

__all__ = [
    "DEFAULT_LOG_PATH",
    "Journal",
    "Recovery",
    "Registers",
    "RuntimeRegisters",
    "WalRecord",
    "decode_wal",
    "encode_wal",
]

DEFAULT_LOG_PATH: Final = "/run/attestation-agent/eventlog"
MAX_LOG_BYTES: Final = 64 * 1024 * 1024  # the log is read whole for every TDX evidence; bound it
_WAL_MAGIC: Final = b"CVMAAWAL"
_WAL_VERSION: Final = 1
_WAL_HEAD: Final = struct.Struct("<8sBBHQ48s48sI")
_WAL_SUM_LEN: Final = 32
_WAL_MAX: Final = _WAL_HEAD.size + eventlog.MAX_TEXT_BYTES + 1024 + _WAL_SUM_LEN  # one entry, bounded text
_LEN: Final = eventlog.EXTEND_LEN

T = TypeVar("T")


class Registers(Protocol):
    """Measurement registers that can be read and extended (TDX: `agent.tee.rtmr_sysfs.SysfsRtmrs`)."""

    def read(self, rtmr: int) -> bytes: ...

    def extend(self, rtmr: int, data: bytes) -> None: ...


class RuntimeRegisters(Registers, Protocol):
    """Registers that may be absent on this kernel (`missing()` says why, or None)."""

    def missing(self) -> str | None: ...


class _NotExtended(Exception):  # an internal signal, never leaves this module
    """The register write failed (`error`) and the register is unchanged: nothing to recover."""

    def __init__(self, error: DeviceError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True, kw_only=True)
class WalRecord:
    offset: int
    rtmr: int
    before: bytes
    after: bytes
    entry: bytes


def encode_wal(record: WalRecord) -> bytes:
    """The WAL file: fixed head, the entry, SHA-256 over both (a torn or altered record does not decode)."""
    head = _WAL_HEAD.pack(
        _WAL_MAGIC, _WAL_VERSION, record.rtmr, 0, record.offset, record.before, record.after, len(record.entry)
    )
    body = head + record.entry
    return body + hashlib.sha256(body).digest()


def decode_wal(data: bytes) -> WalRecord:
    """Parse a WAL file; EvidenceParseError (with what is wrong) for anything but a whole, intact record."""
    if len(data) > _WAL_MAX:
        msg = f"WAL record is more than {_WAL_MAX} bytes, expected one entry"
        raise EvidenceParseError(msg, offset=_WAL_MAX)
    if len(data) < _WAL_HEAD.size + _WAL_SUM_LEN:
        msg = f"WAL record is {len(data)} bytes, expected at least {_WAL_HEAD.size + _WAL_SUM_LEN}"
        raise EvidenceParseError(msg, offset=0)
    body, checksum = data[:-_WAL_SUM_LEN], data[-_WAL_SUM_LEN:]
    if hashlib.sha256(body).digest() != checksum:
        msg = "WAL record checksum does not match its contents, expected an intact record"
        raise EvidenceParseError(msg, offset=len(body))
    magic, version, rtmr, _reserved, offset, before, after, size = _WAL_HEAD.unpack_from(body)
    if magic != _WAL_MAGIC or version != _WAL_VERSION:
        msg = f"WAL record magic/version is {magic!r}/{version}, expected {_WAL_MAGIC!r}/{_WAL_VERSION}"
        raise EvidenceParseError(msg, offset=0)
    if size != len(body) - _WAL_HEAD.size or not 0 <= rtmr < ccel.RTMR_COUNT:
        msg = f"WAL record entry size/register is {size}/{rtmr}, expected {len(body) - _WAL_HEAD.size}/0..3"
        raise EvidenceParseError(msg, offset=_WAL_HEAD.size - 4)
    return WalRecord(offset=offset, rtmr=rtmr, before=before, after=after, entry=body[_WAL_HEAD.size :])


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """What `Journal.open` found: the pending entry's fate (if there was one) and the log's size."""

    pending: Literal["none", "completed", "discarded"]
    entries: int
    detail: str = ""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The agent's event log with crash-safe extends. Thread-safe; `open()` before use, `close()` after."""

    def __init__(self, path: str | Path, registers: Registers, *, firmware: Sequence[ccel.Event] = ()) -> None:
        self.path = Path(path)
        self.wal_path = self.path.with_name(f".{self.path.name}.wal")
        self._tmp_path = self.path.with_name(f".{self.path.name}.wal.tmp")
        self._registers = registers
        self._firmware = tuple(firmware)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0
        self._count = 0
        self._broken: str | None = None

    # -- lifecycle

    def open(self) -> Recovery:
        """Lock and recover the log; MeasurementError (with the reason) if log and registers cannot agree."""
        with self._lock:
            if self._fd is not None:
                msg = "the journal is already open"
                raise RuntimeError(msg)
            self._fd = self._open_log()
            try:
                recovery = self._recover()
            except BaseException:
                os.close(self._fd)
                self._fd = None
                raise
            return recovery

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # releases the flock
                self._fd = None

    def _open_log(self) -> int:
        folder = self.path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            msg = f"event log `{self.path}` cannot be opened: {exc.strerror}"
            raise MeasurementError(msg) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            msg = f"event log `{self.path}` is locked by another process (is another agent running?)"
            raise MeasurementError(msg) from None
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return fd

    # -- recovery

    def _recover(self) -> Recovery:
        with contextlib.suppress(FileNotFoundError):
            self._tmp_path.unlink()  # a WAL record that was never renamed into place: nothing was extended
        pending: Literal["none", "completed", "discarded"] = "none"
        detail = ""
        try:
            with self.wal_path.open("rb") as wal:
                raw = wal.read(_WAL_MAX + 1)
        except FileNotFoundError:
            raw = None
        except OSError as exc:
            msg = f"journal `{self.wal_path}` cannot be read ({exc.strerror}); refusing to guess what was extended"
            raise MeasurementError(msg) from exc
        if raw is not None:
            pending, detail = self._resolve(raw)
        data = self._read_log()
        try:
            events = eventlog.parse_agent_log(data)
        except EvidenceParseError as exc:
            msg = f"event log `{self.path}` does not parse: {exc}"
            raise MeasurementError(msg) from exc
        self._size, self._count = len(data), len(events)
        self._check(events)
        return Recovery(pending=pending, entries=len(events), detail=detail)

    def _resolve(self, raw: bytes) -> tuple[Literal["completed", "discarded"], str]:
        try:
            record = decode_wal(raw)
        except EvidenceParseError as exc:
            msg = f"journal `{self.wal_path}` is unreadable ({exc}); cannot tell whether its extend happened"
            raise MeasurementError(msg) from exc
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        if size < record.offset:
            msg = (
                f"event log `{self.path}` is 0x{size:x} bytes, expected at least 0x{record.offset:x} (the pending "
                "entry's offset): entries were lost"
            )
            raise MeasurementError(msg)
        live = self._registers.read(record.rtmr)
        if live == record.after:
            self._write_at(record.offset, record.entry)
            outcome: Literal["completed", "discarded"] = "completed"
            detail = f"RTMR{record.rtmr} holds the pending extend; its entry was written"
        elif live == record.before:
            os.ftruncate(fd, record.offset)
            os.fsync(fd)
            outcome = "discarded"
            detail = f"RTMR{record.rtmr} was not extended; the pending entry was dropped"
        else:
            msg = (
                f"RTMR{record.rtmr} is {live.hex()}, expected {record.before.hex()} (pending entry not extended) or "
                f"{record.after.hex()} (extended): something else extended the register"
            )
            raise MeasurementError(msg)
        self.wal_path.unlink()
        _fsync_dir(self.path.parent)
        return outcome, detail

    def _check(self, events: Sequence[ccel.Event]) -> None:
        touched = {e.mr_index - 1 for e in events if e.mr_index > 0}
        if not touched:
            return
        actual = [self._registers.read(i) if i in touched else bytes(_LEN) for i in range(ccel.RTMR_COUNT)]
        try:
            report = eventlog.replay(eventlog.items(self._firmware, events), actual, registers=touched)
        except EvidenceParseError as exc:
            msg = f"event log `{self.path}` cannot be replayed: {exc}"
            raise MeasurementError(msg) from exc
        if report.divergence is not None:
            msg = f"event log `{self.path}` does not replay to the registers: {report.divergence.describe()}"
            raise MeasurementError(msg)

    # -- operations

    def extend(self, entry: ccel.Event) -> None:
        """Extend the register `entry` names with its SHA-384 digest and append it to the log, crash-safely."""
        digest = entry.digest(ccel.TcgAlgorithm.SHA384)
        if digest is None or not 1 <= entry.mr_index <= ccel.RTMR_COUNT:
            msg = "entry must carry a SHA-384 digest and name RTMR0..3 (MR index 1..4)"
            raise ValueError(msg)
        rtmr = entry.mr_index - 1
        data = entry.to_bytes()
        with self._lock:
            if self._broken is not None:
                raise MeasurementError(self._broken)
            if self._size + len(data) > MAX_LOG_BYTES:
                msg = f"event log is 0x{self._size:x} bytes, expected at most 0x{MAX_LOG_BYTES:x} with this entry"
                raise MeasurementError(msg)
            before = self._registers.read(rtmr)
            after = eventlog.extended(before, digest)
            self._write_wal(WalRecord(offset=self._size, rtmr=rtmr, before=before, after=after, entry=data))
            try:
                self._extend(rtmr, digest, before, after)
                self._write_at(self._size, data)
                self._drop_wal()
            except _NotExtended as failed:
                self._drop_wal()
                raise failed.error from None
            except BaseException as exc:
                # the register may hold the extend while the log does not: stop here; a restart recovers from
                # the WAL record, which is still in place
                self._broken = f"runtime measurement is stopped after a failed extend of RTMR{rtmr}: {exc}"
                raise MeasurementError(self._broken) from exc
            self._size += len(data)
            self._count += 1

    def _extend(self, rtmr: int, digest: bytes, before: bytes, after: bytes) -> None:
        try:
            self._registers.extend(rtmr, eventlog.extend_data(digest))
        except DeviceError as exc:
            now = self._registers.read(rtmr)
            if now == before:
                raise _NotExtended(exc) from exc
            if now != after:
                msg = f"RTMR{rtmr} is {now.hex()} after a failed extend, expected {before.hex()} or {after.hex()}"
                raise MeasurementError(msg) from exc

    def log_bytes(self) -> bytes:
        """The agent's entries as they are now."""
        with self._lock:
            return self._read_log()

    def run_locked(self, fn: Callable[[], T]) -> tuple[T, bytes]:
        """`fn()` and the log, with no extend in between (a quote and the log that replays to it)."""
        with self._lock:
            return fn(), self._read_log()

    @property
    def entries(self) -> int:
        return self._count

    # -- files

    def _require_fd(self) -> int:
        if self._fd is None:
            msg = "the journal is not open"
            raise RuntimeError(msg)
        return self._fd

    def _read_log(self) -> bytes:
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        if size > MAX_LOG_BYTES:
            msg = f"event log `{self.path}` is 0x{size:x} bytes, expected at most 0x{MAX_LOG_BYTES:x}"
            raise MeasurementError(msg)
        chunks: list[bytes] = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def _write_at(self, offset: int, data: bytes) -> None:
        fd = self._require_fd()
        os.ftruncate(fd, offset)  # drop a partly written entry left by a crash
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        os.fsync(fd)

    def _write_wal(self, record: WalRecord) -> None:
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(encode_wal(record))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._tmp_path.replace(self.wal_path)
        _fsync_dir(self.path.parent)

    def _drop_wal(self) -> None:
        self.wal_path.unlink()
        _fsync_dir(self.path.parent)
