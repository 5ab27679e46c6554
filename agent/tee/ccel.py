"""TDX CCEL event logs (TCG2 crypto-agile format), RTMR replay, AAEL entries and the `cc_eventlog` bytes. Pure.

Formats follow hw-abi.md §5 (TCG PC Client PFP spec, UEFI CCEL) and guest-api.md §5.2 / §7.1; integers are
little-endian.

- The log starts with one legacy `TCG_PCR_EVENT` (SHA-1-sized digest field) carrying `TCG_EfiSpecIDEvent`, which
  declares the digest algorithms and sizes; then `TCG_PCR_EVENT2` records follow. Digest sizes come from the
  Spec-ID header; an event may only use declared algorithms.
- The log ends at an event boundary where 8 bytes are all 0x00 or all 0xFF (guest-components' end test), or at the
  end of the data. Everything from there on (end marker, 0xFF/0x00 padding of the ACPI region) is kept verbatim in
  `EventLog.tail`, so `parse_event_log(b).to_bytes() == b`. A short (< 8 bytes) tail must be uniform 0x00 or 0xFF.
- Replay: RTMR[i] starts as 48 zero bytes and becomes SHA-384(RTMR[i] || digest) for every event with CC MR index
  i + 1 that is not `EV_NO_ACTION`.

Only `EvidenceParseError` leaves a parser.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.errors import EvidenceParseError
from agent.tee._layout import Span as _Span
from agent.tee._layout import u16 as _u16
from agent.tee._layout import u32 as _u32

__all__ = [
    "AAEL_TAG_ID",
    "CCEL_TABLE_LEN",
    "END_MARKER",
    "EV_EVENT_TAG",
    "EV_NO_ACTION",
    "NO_CCEL_HEADER",
    "RTMR_COUNT",
    "AaelEvent",
    "CcelTable",
    "Digest",
    "DigestSize",
    "Event",
    "EventLog",
    "SpecIdEvent",
    "TcgAlgorithm",
    "aael_entry",
    "aael_event_data",
    "build_cc_eventlog",
    "encode_aael_entry",
    "event_type_name",
    "parse_aael_event",
    "parse_ccel_table",
    "parse_event_log",
    "replay_rtmrs",
    "trim_ccel",
]


EV_NO_ACTION = 0x3
EV_EVENT_TAG = 0x6
AAEL_TAG_ID = 0x4141454C  # bytes 4C 45 41 41 ("LEAA") on disk
END_MARKER = b"\xff" * 8
_END_MARKERS = (b"\x00" * 8, END_MARKER)
RTMR_COUNT = 4
_RTMR_LEN = 48
_MAX_MR_INDEX = RTMR_COUNT  # CC MR index 1..4 -> RTMR0..3; 0 is MRTD


class TcgAlgorithm(enum.IntEnum):
    """TCG algorithm ids that appear in CC event logs."""

    SHA1 = 0x0004
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    SM3_256 = 0x0012


_ALG_SIZES = {
    TcgAlgorithm.SHA1: 20,
    TcgAlgorithm.SHA256: 32,
    TcgAlgorithm.SHA384: 48,
    TcgAlgorithm.SHA512: 64,
    TcgAlgorithm.SM3_256: 32,
}
_ALG_NAMES = {
    TcgAlgorithm.SHA1: "SHA-1",
    TcgAlgorithm.SHA256: "SHA-256",
    TcgAlgorithm.SHA384: "SHA-384",
    TcgAlgorithm.SHA512: "SHA-512",
    TcgAlgorithm.SM3_256: "SM3",
}
_KNOWN_ALG_IDS = frozenset(int(a) for a in TcgAlgorithm)
_HASHLIB_NAMES = {
    TcgAlgorithm.SHA1: "sha1",
    TcgAlgorithm.SHA256: "sha256",
    TcgAlgorithm.SHA384: "sha384",
    TcgAlgorithm.SHA512: "sha512",
    TcgAlgorithm.SM3_256: "sm3",
}

# TCG PC Client PFP event types (names as Trustee's eventlog crate prints them)
_EVENT_TYPE_NAMES = {
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x2: "EV_UNUSED",
    0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}


def event_type_name(event_type: int) -> str:
    """The TCG name of an event type, or `0x…` for an unnamed one."""
    return _EVENT_TYPE_NAMES.get(event_type, f"0x{event_type:08x}")


def _alg_name(alg_id: int) -> str:
    try:
        return _ALG_NAMES[TcgAlgorithm(alg_id)]
    except ValueError:
        return f"0x{alg_id:04x}"


def _hash(alg_id: int, data: bytes) -> bytes | None:
    """H(data) for a TCG algorithm id, or None if this Python cannot compute it (SM3 needs OpenSSL support)."""
    try:
        name = _HASHLIB_NAMES[TcgAlgorithm(alg_id)]
        return hashlib.new(name, data).digest()
    except ValueError:
        return None


def _need(data: bytes, offset: int, size: int, what: str) -> None:
    if len(data) < offset + size:
        msg = f"{what} at 0x{offset:x} needs 0x{size:x} bytes, expected at least 0x{offset + size:x} bytes of log"
        raise EvidenceParseError(msg, offset=offset)


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes):
        msg = f"`{name}` must be bytes, not {type(value).__name__}"
        raise TypeError(msg)


def _check_u32(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        msg = f"`{name}` is {value!r}, expected a u32"
        raise ValueError(msg)


# --- Spec ID header ---------------------------------------------------------------------------------------------

# TCG_PCR_EVENT (legacy, first record)
_PE_MR_INDEX = _Span(0, 4)
_PE_EVENT_TYPE = _Span(4, 4)
_PE_DIGEST = _Span(8, 20)
_PE_EVENT_SIZE = _Span(28, 4)
_PE_HEADER_LEN = 32
# TCG_EfiSpecIDEvent (relative to the event data)
_SI_SIGNATURE = _Span(0, 16)
_SI_PLATFORM_CLASS = _Span(16, 4)
_SI_VERSION_MINOR = 20
_SI_VERSION_MAJOR = 21
_SI_ERRATA = 22
_SI_UINTN_SIZE = 23
_SI_NUM_ALGS = _Span(24, 4)
_SI_ALGS = 28  # {u16 alg id, u16 digest size} x n, then u8 vendorInfoSize, vendorInfo
_SI_ALG_LEN = 4

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
# guest-components' fixed no-CCEL header leaves the signature and version fields zero (guest-api.md §5.2)
_SPEC_ID_SIGNATURES = (SPEC_ID_SIGNATURE, b"\x00" * 16)


@dataclass(frozen=True, slots=True, kw_only=True)
class DigestSize:
    """One algorithm declared by the Spec-ID header."""

    alg_id: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.alg_id <= 0xFFFF or not 1 <= self.size <= 0xFFFF:
            msg = f"`alg_id`/`size` are 0x{self.alg_id:x}/0x{self.size:x}, expected u16 values (size > 0)"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecIdEvent:
    """The first log record: a legacy EV_NO_ACTION `TCG_PCR_EVENT` holding `TCG_EfiSpecIDEvent`."""

    mr_index: int
    signature: bytes
    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[DigestSize, ...]
    vendor_info: bytes = b""

    def __post_init__(self) -> None:
        _check_u32("mr_index", self.mr_index)
        _check_u32("platform_class", self.platform_class)
        if self.signature not in _SPEC_ID_SIGNATURES:
            msg = f"`signature` is {self.signature!r}, expected {SPEC_ID_SIGNATURE!r} or 16 zero bytes"
            raise ValueError(msg)
        for name in ("spec_version_minor", "spec_version_major", "spec_errata", "uintn_size"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                msg = f"`{name}` is {value}, expected a u8"
                raise ValueError(msg)
        if not self.algorithms:
            msg = "`algorithms` is empty, expected at least one digest algorithm"
            raise ValueError(msg)
        if len({a.alg_id for a in self.algorithms}) != len(self.algorithms):
            msg = "`algorithms` lists an algorithm twice"
            raise ValueError(msg)
        if len(self.vendor_info) > 0xFF:
            msg = f"`vendor_info` length is 0x{len(self.vendor_info):x}, expected at most 0xff"
            raise ValueError(msg)

    def digest_size(self, alg_id: int) -> int | None:
        return next((a.size for a in self.algorithms if a.alg_id == alg_id), None)

    def to_bytes(self) -> bytes:
        data = (
            self.signature
            + struct.pack(
                "<IBBBBI",
                self.platform_class,
                self.spec_version_minor,
                self.spec_version_major,
                self.spec_errata,
                self.uintn_size,
                len(self.algorithms),
            )
            + b"".join(struct.pack("<HH", a.alg_id, a.size) for a in self.algorithms)
            + bytes((len(self.vendor_info),))
            + self.vendor_info
        )
        return (
            struct.pack("<II", self.mr_index, EV_NO_ACTION)
            + bytes(_PE_DIGEST.size)
            + struct.pack("<I", len(data))
            + data
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mr_index": self.mr_index,
            "signature": self.signature.rstrip(b"\x00").decode("ascii"),
            "platform_class": self.platform_class,
            "spec_version": f"{self.spec_version_major}.{self.spec_version_minor}",
            "spec_errata": self.spec_errata,
            "uintn_size": self.uintn_size,
            "algorithms": [{"alg": _alg_name(a.alg_id), "alg_id": a.alg_id, "size": a.size} for a in self.algorithms],
            "vendor_info": self.vendor_info.hex(),
        }


def _parse_spec_id(data: bytes) -> tuple[SpecIdEvent, int]:
    _need(data, 0, _PE_HEADER_LEN, "Spec ID event header")
    event_type = _u32(data, _PE_EVENT_TYPE.start)
    if event_type != EV_NO_ACTION:
        msg = f"first event `event_type` is 0x{event_type:x}, expected 0x3 (EV_NO_ACTION Spec ID event)"
        raise EvidenceParseError(msg, offset=_PE_EVENT_TYPE.start)
    digest = data[_PE_DIGEST.start : _PE_DIGEST.end]
    if any(digest):
        at = _PE_DIGEST.start + next(i for i, b in enumerate(digest) if b)
        msg = f"Spec ID event digest byte at 0x{at:x} is 0x{data[at]:02x}, expected 0x00"
        raise EvidenceParseError(msg, offset=at)
    size = _u32(data, _PE_EVENT_SIZE.start)
    base = _PE_HEADER_LEN
    _need(data, base, size, "Spec ID event data")
    ev = data[base : base + size]
    if size < _SI_ALGS:
        msg = f"Spec ID event size is 0x{size:x}, expected at least 0x{_SI_ALGS + 1:x}"
        raise EvidenceParseError(msg, offset=_PE_EVENT_SIZE.start)
    signature = ev[_SI_SIGNATURE.start : _SI_SIGNATURE.end]
    if signature not in _SPEC_ID_SIGNATURES:
        msg = f"Spec ID `signature` is {signature!r}, expected {SPEC_ID_SIGNATURE!r} or 16 zero bytes"
        raise EvidenceParseError(msg, offset=base)
    count = _u32(ev, _SI_NUM_ALGS.start)
    vendor_size_at = _SI_ALGS + count * _SI_ALG_LEN
    if count == 0 or vendor_size_at + 1 > size:
        msg = (
            f"Spec ID `numberOfAlgorithms` is {count}, expected 1..{max((size - _SI_ALGS - 1) // _SI_ALG_LEN, 0)} "
            f"(event size 0x{size:x})"
        )
        raise EvidenceParseError(msg, offset=base + _SI_NUM_ALGS.start)
    algorithms: list[DigestSize] = []
    for i in range(count):
        at = _SI_ALGS + i * _SI_ALG_LEN
        alg_id, alg_size = _u16(ev, at), _u16(ev, at + 2)
        known = _ALG_SIZES[TcgAlgorithm(alg_id)] if alg_id in _KNOWN_ALG_IDS else None
        if (known is not None and alg_size != known) or alg_size == 0:
            want = f"0x{known:x}" if known is not None else "non-zero"
            msg = f"digest size of {_alg_name(alg_id)} is 0x{alg_size:x}, expected {want}"
            raise EvidenceParseError(msg, offset=base + at + 2)
        if any(a.alg_id == alg_id for a in algorithms):
            msg = f"Spec ID algorithm {_alg_name(alg_id)} is listed twice, expected once"
            raise EvidenceParseError(msg, offset=base + at)
        algorithms.append(DigestSize(alg_id=alg_id, size=alg_size))
    vendor_size = ev[vendor_size_at]
    if vendor_size_at + 1 + vendor_size != size:
        msg = (
            f"Spec ID event size is 0x{size:x}, expected 0x{vendor_size_at + 1 + vendor_size:x} "
            f"(vendorInfoSize 0x{vendor_size:x})"
        )
        raise EvidenceParseError(msg, offset=_PE_EVENT_SIZE.start)
    spec = SpecIdEvent(
        mr_index=_u32(data, _PE_MR_INDEX.start),
        signature=signature,
        platform_class=_u32(ev, _SI_PLATFORM_CLASS.start),
        spec_version_minor=ev[_SI_VERSION_MINOR],
        spec_version_major=ev[_SI_VERSION_MAJOR],
        spec_errata=ev[_SI_ERRATA],
        uintn_size=ev[_SI_UINTN_SIZE],
        algorithms=tuple(algorithms),
        vendor_info=ev[vendor_size_at + 1 : size],
    )
    return spec, base + size


# --- TCG_PCR_EVENT2 ---------------------------------------------------------------------------------------------

_E2_HEADER_LEN = 12  # mr index, event type, digest count
_E2_ALG_LEN = 2
_E2_SIZE_LEN = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Digest:
    alg_id: int
    digest: bytes

    def __post_init__(self) -> None:
        _check_bytes("digest", self.digest)
        if not 0 <= self.alg_id <= 0xFFFF:
            msg = f"`alg_id` is 0x{self.alg_id:x}, expected a u16"
            raise ValueError(msg)
        if self.alg_id in _KNOWN_ALG_IDS:
            want = _ALG_SIZES[TcgAlgorithm(self.alg_id)]
            if len(self.digest) != want:
                msg = f"`digest` length of {_alg_name(self.alg_id)} is 0x{len(self.digest):x}, expected 0x{want:x}"
                raise ValueError(msg)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A `TCG_PCR_EVENT2` record. `mr_index` is the CC MR index (1..4 = RTMR0..3)."""

    mr_index: int
    event_type: int
    digests: tuple[Digest, ...]
    data: bytes

    def __post_init__(self) -> None:
        _check_u32("mr_index", self.mr_index)
        _check_u32("event_type", self.event_type)
        if not self.digests:
            msg = "`digests` is empty, expected at least one digest"
            raise ValueError(msg)
        _check_bytes("data", self.data)

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def digest(self, alg_id: int) -> bytes | None:
        return next((d.digest for d in self.digests if d.alg_id == alg_id), None)

    def digest_matches_event(self) -> bool:
        """Whether every digest this Python can compute equals H(event data) (true for AAEL entries)."""
        computed = [(d.digest, _hash(d.alg_id, self.data)) for d in self.digests]
        known = [(got, want) for got, want in computed if want is not None]
        return bool(known) and all(got == want for got, want in known)

    def aael(self) -> AaelEvent | None:
        """The AAEL event carried by this record, if it is an `EV_EVENT_TAG` with the AAEL tag."""
        if self.event_type != EV_EVENT_TAG or len(self.data) < _TAG_HEADER_LEN or _u32(self.data, 0) != AAEL_TAG_ID:
            return None
        return parse_aael_event(self.data)

    def to_bytes(self) -> bytes:
        return (
            struct.pack("<III", self.mr_index, self.event_type, len(self.digests))
            + b"".join(struct.pack("<H", d.alg_id) + d.digest for d in self.digests)
            + struct.pack("<I", len(self.data))
            + self.data
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.mr_index,
            "type": self.event_type,
            "type_name": self.type_name,
            "digests": [{"alg": _alg_name(d.alg_id), "digest": d.digest.hex()} for d in self.digests],
            "data": self.data.hex(),
        }
        try:
            aael = self.aael()
        except EvidenceParseError as exc:
            out["aael_error"] = str(exc)
        else:
            if aael is not None:
                out["aael"] = {"domain": aael.domain, "operation": aael.operation, "content": aael.content}
        return out


def _parse_event(data: bytes, pos: int, spec: SpecIdEvent, number: int) -> tuple[Event, int]:
    _need(data, pos, _E2_HEADER_LEN, f"event {number} header")
    mr_index, event_type, count = struct.unpack_from("<III", data, pos)
    if not 1 <= count <= len(spec.algorithms):
        msg = f"event {number} digest count is {count}, expected 1..{len(spec.algorithms)}"
        raise EvidenceParseError(msg, offset=pos + 8)
    at = pos + _E2_HEADER_LEN
    digests: list[Digest] = []
    for _ in range(count):
        _need(data, at, _E2_ALG_LEN, f"event {number} digest algorithm")
        alg_id = _u16(data, at)
        size = spec.digest_size(alg_id)
        if size is None:
            declared = ", ".join(_alg_name(a.alg_id) for a in spec.algorithms)
            msg = f"event {number} digest algorithm is {_alg_name(alg_id)}, expected one of {declared}"
            raise EvidenceParseError(msg, offset=at)
        if any(d.alg_id == alg_id for d in digests):
            msg = f"event {number} digest algorithm {_alg_name(alg_id)} appears twice, expected once"
            raise EvidenceParseError(msg, offset=at)
        _need(data, at + _E2_ALG_LEN, size, f"event {number} {_alg_name(alg_id)} digest")
        digests.append(Digest(alg_id=alg_id, digest=data[at + _E2_ALG_LEN : at + _E2_ALG_LEN + size]))
        at += _E2_ALG_LEN + size
    _need(data, at, _E2_SIZE_LEN, f"event {number} size")
    size = _u32(data, at)
    at += _E2_SIZE_LEN
    _need(data, at, size, f"event {number} data")
    event = Event(mr_index=mr_index, event_type=event_type, digests=tuple(digests), data=data[at : at + size])
    return event, at + size


# --- the log ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EventLog:
    """A parsed CC event log: Spec-ID header, events, and the tail from the end marker on (kept verbatim)."""

    spec_id: SpecIdEvent
    events: tuple[Event, ...]
    tail: bytes = b""

    def __post_init__(self) -> None:
        if self.tail and not _is_end(self.tail):
            msg = "`tail` must start with an 8-byte all-0x00/all-0xff marker (or be short uniform padding)"
            raise ValueError(msg)

    @property
    def has_end_marker(self) -> bool:
        return self.tail[:8] in _END_MARKERS

    def log_bytes(self) -> bytes:
        """Header and events, without the tail: what `trim_ccel` returns."""
        return self.spec_id.to_bytes() + b"".join(e.to_bytes() for e in self.events)

    def to_bytes(self) -> bytes:
        return self.log_bytes() + self.tail

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "cc_event_log",
            "spec_id": self.spec_id.to_dict(),
            "events": [e.to_dict() for e in self.events],
            "log_length": len(self.log_bytes()),
            "tail_length": len(self.tail),
        }
        try:
            out["replayed_rtmrs"] = [r.hex() for r in replay_rtmrs(self.events)]
        except EvidenceParseError as exc:
            out["replay_error"] = str(exc)
        return out


def _is_end(rest: bytes) -> bool:
    """Does the log end here? Guest-components' test (8 bytes all 0x00/0xff) or short uniform padding."""
    if len(rest) >= len(END_MARKER):
        return rest[: len(END_MARKER)] in _END_MARKERS
    return rest in (b"\x00" * len(rest), b"\xff" * len(rest))


def parse_event_log(data: bytes) -> EventLog:
    """Parse a CC event log (CCEL ACPI data, or a `cc_eventlog` value)."""
    spec, pos = _parse_spec_id(data)
    events: list[Event] = []
    while pos < len(data) and not _is_end(data[pos : pos + len(END_MARKER)]):
        event, pos = _parse_event(data, pos, spec, len(events) + 1)
        events.append(event)
    return EventLog(spec_id=spec, events=tuple(events), tail=data[pos:])


def trim_ccel(data: bytes) -> bytes:
    """Cut CCEL ACPI data at its end marker, as guest-components does before appending AAEL entries.

    Like guest-components, a log without an 8-byte all-0x00/all-0xff marker is an error.
    """
    log = parse_event_log(data)
    if not log.has_end_marker:
        end = len(log.log_bytes())
        msg = f"CCEL end marker at 0x{end:x} is missing, expected 8 bytes of 0x00 or 0xff"
        raise EvidenceParseError(msg, offset=end)
    return log.log_bytes()


def replay_rtmrs(events: EventLog | Iterable[Event]) -> tuple[bytes, bytes, bytes, bytes]:
    """Replay events into RTMR0..3 (SHA-384). EV_NO_ACTION and MR index 0 (MRTD) events are not extended."""
    items = events.events if isinstance(events, EventLog) else events
    rtmrs = [bytes(_RTMR_LEN) for _ in range(RTMR_COUNT)]
    for number, event in enumerate(items, start=1):
        if event.event_type == EV_NO_ACTION or event.mr_index == 0:
            continue
        if event.mr_index > _MAX_MR_INDEX:
            msg = f"event {number} MR index is {event.mr_index}, expected 0..{_MAX_MR_INDEX}"
            raise EvidenceParseError(msg)
        digest = event.digest(TcgAlgorithm.SHA384)
        if digest is None:
            msg = f"event {number} SHA-384 digest is missing, expected one to extend RTMR{event.mr_index - 1}"
            raise EvidenceParseError(msg)
        i = event.mr_index - 1
        rtmrs[i] = hashlib.sha384(rtmrs[i] + digest).digest()
    return (rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3])


# --- AAEL -------------------------------------------------------------------------------------------------------

_TAG_HEADER_LEN = 8  # u32 tag id, u32 text length


@dataclass(frozen=True, slots=True, kw_only=True)
class AaelEvent:
    """An attestation-agent event `"<domain> <operation> <content>"` (guest-api.md §7.1)."""

    domain: str
    operation: str
    content: str

    def __post_init__(self) -> None:
        for name in ("domain", "operation"):
            value = getattr(self, name)
            if not value or " " in value or "\n" in value:
                msg = f"`{name}` is {value!r}, expected a non-empty string without spaces or newlines"
                raise ValueError(msg)
        if "\n" in self.content:
            msg = "`content` contains a newline, expected a single line"
            raise ValueError(msg)
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            msg = f"event text character at {exc.start} is not encodable as UTF-8, expected valid text"
            raise ValueError(msg) from exc

    @property
    def text(self) -> str:
        return f"{self.domain} {self.operation} {self.content}"


def aael_event_data(event: AaelEvent) -> bytes:
    """The tagged-event bytes that are logged and hashed: u32 0x4141454C, u32 length, UTF-8 text."""
    text = event.text.encode("utf-8")
    return struct.pack("<II", AAEL_TAG_ID, len(text)) + text


def aael_entry(event: AaelEvent, *, alg: TcgAlgorithm = TcgAlgorithm.SHA384, mr_index: int = RTMR_COUNT) -> Event:
    """The AAEL `TCG_PCR_EVENT2` record: EV_EVENT_TAG, one digest = H(tagged event) (not H(text)); RTMR3 by default."""
    data = aael_event_data(event)
    digest = _hash(alg, data)
    if digest is None:
        msg = f"hash algorithm {_alg_name(alg)} is not available in this Python build"
        raise ValueError(msg)
    return Event(mr_index=mr_index, event_type=EV_EVENT_TAG, digests=(Digest(alg_id=alg, digest=digest),), data=data)


def encode_aael_entry(
    event: AaelEvent, *, alg: TcgAlgorithm = TcgAlgorithm.SHA384, mr_index: int = RTMR_COUNT
) -> bytes:
    """`aael_entry(...)` as bytes: what the agent's log file and `cc_eventlog` carry."""
    return aael_entry(event, alg=alg, mr_index=mr_index).to_bytes()


def parse_aael_event(data: bytes) -> AaelEvent:
    """Parse the data of an AAEL `EV_EVENT_TAG` event."""
    if len(data) < _TAG_HEADER_LEN:
        msg = f"AAEL event length is 0x{len(data):x}, expected at least 0x{_TAG_HEADER_LEN:x}"
        raise EvidenceParseError(msg, offset=0)
    tag, size = struct.unpack_from("<II", data, 0)
    if tag != AAEL_TAG_ID:
        msg = f"tagged event id is 0x{tag:08x}, expected 0x{AAEL_TAG_ID:08x} (AAEL)"
        raise EvidenceParseError(msg, offset=0)
    if size != len(data) - _TAG_HEADER_LEN:
        msg = f"AAEL text length is 0x{size:x}, expected 0x{len(data) - _TAG_HEADER_LEN:x}"
        raise EvidenceParseError(msg, offset=4)
    try:
        text = data[_TAG_HEADER_LEN:].decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"AAEL text byte at 0x{_TAG_HEADER_LEN + exc.start:x} is not UTF-8, expected UTF-8 text"
        raise EvidenceParseError(msg, offset=_TAG_HEADER_LEN + exc.start) from exc
    parts = text.split(" ", 2)
    if len(parts) != 3:
        msg = f"AAEL text is {text[:60]!r}, expected '<domain> <operation> <content>'"
        raise EvidenceParseError(msg, offset=_TAG_HEADER_LEN)
    try:
        return AaelEvent(domain=parts[0], operation=parts[1], content=parts[2])
    except ValueError as exc:
        msg = f"AAEL text is invalid: {exc}"
        raise EvidenceParseError(msg, offset=_TAG_HEADER_LEN) from exc


# The 69-byte header guest-components puts in front of AAEL entries when there is no CCEL (guest-api.md §5.2):
# a legacy EV_NO_ACTION record at MR index 0 whose Spec-ID data has zero signature/version fields and declares
# SHA-384 (0x000C, 48) and SM3 (0x0012, 32).
NO_CCEL_HEADER = SpecIdEvent(
    mr_index=0,
    signature=b"\x00" * 16,
    platform_class=0,
    spec_version_minor=0,
    spec_version_major=0,
    spec_errata=0,
    uintn_size=0,
    algorithms=(
        DigestSize(alg_id=TcgAlgorithm.SHA384, size=48),
        DigestSize(alg_id=TcgAlgorithm.SM3_256, size=32),
    ),
).to_bytes()


def build_cc_eventlog(ccel: bytes | None, aael: bytes | None) -> bytes | None:
    """The `cc_eventlog` bytes of TDX evidence (before base64), as guest-components builds them.

    `ccel` is the raw CCEL ACPI data (None if absent); `aael` the agent's concatenated AAEL entries (None if the
    agent has no event-log file). Result: trimmed CCEL (or `NO_CCEL_HEADER` when there is only AAEL), then the AAEL
    entries, then 8 x 0xff; None when neither exists. The AAEL entries are checked to parse under the header.
    """
    if ccel is None and aael is None:
        return None
    head = trim_ccel(ccel) if ccel is not None else NO_CCEL_HEADER
    out = head + (aael or b"") + END_MARKER
    log = parse_event_log(out)
    if log.tail != END_MARKER:
        msg = f"AAEL entries end at 0x{len(log.log_bytes()):x}, expected them to end at 0x{len(out) - 8:x}"
        raise EvidenceParseError(msg, offset=len(log.log_bytes()))
    return out


# --- ACPI CCEL table --------------------------------------------------------------------------------------------

CCEL_TABLE_LEN = 56
_CT_SIGNATURE = _Span(0, 4)
_CT_LENGTH = _Span(4, 4)
_CT_REVISION = 8
_CT_CHECKSUM = 9
_CT_OEM_ID = _Span(10, 6)
_CT_OEM_TABLE_ID = _Span(16, 8)
_CT_OEM_REVISION = _Span(24, 4)
_CT_CREATOR_ID = _Span(28, 4)
_CT_CREATOR_REVISION = _Span(32, 4)
_CT_CC_TYPE = 36
_CT_CC_SUBTYPE = 37
_CT_RESERVED = _Span(38, 2)
_CT_LAML = _Span(40, 8)
_CT_LASA = _Span(48, 8)
_CC_TYPES = {1: "SEV", 2: "TDX"}


@dataclass(frozen=True, slots=True, kw_only=True)
class CcelTable:
    """The 56-byte ACPI CCEL table (`/sys/firmware/acpi/tables/CCEL`); the checksum is computed on output."""

    revision: int
    oem_id: bytes
    oem_table_id: bytes
    oem_revision: int
    creator_id: bytes
    creator_revision: int
    cc_type: int
    cc_subtype: int
    laml: int
    lasa: int

    def __post_init__(self) -> None:
        if len(self.oem_id) != _CT_OEM_ID.size or len(self.oem_table_id) != _CT_OEM_TABLE_ID.size:
            msg = "`oem_id` must be 6 bytes and `oem_table_id` 8 bytes"
            raise ValueError(msg)
        if len(self.creator_id) != _CT_CREATOR_ID.size:
            msg = "`creator_id` must be 4 bytes"
            raise ValueError(msg)
        if self.cc_type not in _CC_TYPES:
            msg = f"`cc_type` is {self.cc_type}, expected 1 (SEV) or 2 (TDX)"
            raise ValueError(msg)

    def to_bytes(self) -> bytes:
        body = bytearray(
            b"CCEL"
            + struct.pack("<IBB", CCEL_TABLE_LEN, self.revision, 0)
            + self.oem_id
            + self.oem_table_id
            + struct.pack("<I", self.oem_revision)
            + self.creator_id
            + struct.pack("<IBBHQQ", self.creator_revision, self.cc_type, self.cc_subtype, 0, self.laml, self.lasa)
        )
        body[_CT_CHECKSUM] = -sum(body) & 0xFF
        return bytes(body)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "acpi_ccel_table",
            "revision": self.revision,
            "oem_id": self.oem_id.decode("latin-1"),
            "oem_table_id": self.oem_table_id.decode("latin-1"),
            "oem_revision": self.oem_revision,
            "creator_id": self.creator_id.decode("latin-1"),
            "creator_revision": self.creator_revision,
            "cc_type": self.cc_type,
            "cc_type_name": _CC_TYPES[self.cc_type],
            "cc_subtype": self.cc_subtype,
            "laml": self.laml,
            "lasa": f"0x{self.lasa:x}",
        }


def parse_ccel_table(data: bytes) -> CcelTable:
    """Parse the ACPI CCEL table; the signature, length, checksum, CC type and reserved field are checked."""
    if len(data) != CCEL_TABLE_LEN:
        msg = f"CCEL table length is 0x{len(data):x}, expected 0x{CCEL_TABLE_LEN:x}"
        raise EvidenceParseError(msg, offset=0)
    if data[_CT_SIGNATURE.start : _CT_SIGNATURE.end] != b"CCEL":
        msg = f"ACPI table signature is {data[:4]!r}, expected b'CCEL'"
        raise EvidenceParseError(msg, offset=0)
    length = _u32(data, _CT_LENGTH.start)
    if length != CCEL_TABLE_LEN:
        msg = f"ACPI header `Length` is 0x{length:x}, expected 0x{CCEL_TABLE_LEN:x}"
        raise EvidenceParseError(msg, offset=_CT_LENGTH.start)
    if sum(data) & 0xFF:
        msg = f"ACPI checksum sum is 0x{sum(data) & 0xFF:02x}, expected 0x00"
        raise EvidenceParseError(msg, offset=_CT_CHECKSUM)
    if data[_CT_CC_TYPE] not in _CC_TYPES:
        msg = f"CCEL `CC Type` is {data[_CT_CC_TYPE]}, expected 1 (SEV) or 2 (TDX)"
        raise EvidenceParseError(msg, offset=_CT_CC_TYPE)
    if any(data[_CT_RESERVED.start : _CT_RESERVED.end]):
        msg = f"CCEL reserved field at 0x{_CT_RESERVED.start:x} is {data[38:40].hex()}, expected 0000"
        raise EvidenceParseError(msg, offset=_CT_RESERVED.start)
    return CcelTable(
        revision=data[_CT_REVISION],
        oem_id=data[_CT_OEM_ID.start : _CT_OEM_ID.end],
        oem_table_id=data[_CT_OEM_TABLE_ID.start : _CT_OEM_TABLE_ID.end],
        oem_revision=_u32(data, _CT_OEM_REVISION.start),
        creator_id=data[_CT_CREATOR_ID.start : _CT_CREATOR_ID.end],
        creator_revision=_u32(data, _CT_CREATOR_REVISION.start),
        cc_type=data[_CT_CC_TYPE],
        cc_subtype=data[_CT_CC_SUBTYPE],
        laml=int.from_bytes(data[_CT_LAML.start : _CT_LAML.end], "little"),
        lasa=int.from_bytes(data[_CT_LASA.start : _CT_LASA.end], "little"),
    )
