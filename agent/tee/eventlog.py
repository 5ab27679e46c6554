"""Runtime measurement: AAEL entries, the PCR → RTMR map, the extend rule, and replay that names what diverges. Pure.

Builds on `agent.tee.ccel` (the TCG2 crypto-agile records, the AAEL tagged event and its parser); facts from
guest-api.md §7 and hw-abi.md §4-5.

- Event text `"<domain> <operation> <content>"` (`ccel.AaelEvent`); the log entry is a `TCG_PCR_EVENT2` with
  event type `EV_EVENT_TAG` whose data is the tagged event `u32 0x4141454C ("LEAA" on disk) | u32 length | text`,
  and whose one digest is H(tagged event) with the platform's log hash (TDX: SHA-384).
- `RegisterIndex` is a TPM PCR index; TDX maps it to a CC MR index (`1, 7 → 1`; `2..6 → 2`; `8..15 → 3`; every
  other index, PCR 0 included, → 4) and RTMR = CC MR - 1, so the default PCR 17 is RTMR3. The entry records the
  CC MR index of the register actually extended.
- Extend: the digest zero-padded (or truncated) to 48 bytes is written; RTMR' = SHA-384(RTMR ‖ data48).
- The agent's own log (the file behind `AAEL_PATH`) is just the concatenated entries; `parse_agent_log` reads it
  under a synthetic SHA-384 Spec-ID header.
- `replay` checks a log (firmware CCEL events, then agent entries) against RTMR0..3 and names the first entry that
  diverges: an AAEL entry whose digest is not H(its data); an entry logged but never extended (the register equals
  the replay of the entries before it); or, when no prefix of the register's entries explains it, the register
  holds an extend no entry records (named after the register's last entry).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from agent.errors import EvidenceParseError
from agent.tee import ccel

__all__ = [
    "DEFAULT_INIT_PCR",
    "EXTEND_LEN",
    "MAX_PCR",
    "MAX_TEXT_BYTES",
    "Divergence",
    "LogItem",
    "RegisterReplay",
    "ReplayReport",
    "cc_mr_for_pcr",
    "extend_data",
    "extended",
    "items",
    "items_from_cc_eventlog",
    "measurement_entry",
    "parse_agent_log",
    "replay",
    "rtmr_for_pcr",
]

DEFAULT_INIT_PCR: Final = 17
MAX_PCR: Final = 23  # TPM PCR indices 0..23 (the reference's `init_pcr` range)
EXTEND_LEN: Final = 48  # an RTMR and an extend are SHA-384 sized
MAX_TEXT_BYTES: Final = 64 * 1024  # bound on one event's text (the CDH's PullImage content is ~200 bytes)
_ZERO: Final = bytes(EXTEND_LEN)
_SHOWN: Final = 100  # characters of event text in messages
_AGENT_HEADER: Final = ccel.SpecIdEvent(
    mr_index=0,
    signature=ccel.SPEC_ID_SIGNATURE,
    platform_class=0,
    spec_version_minor=0,
    spec_version_major=2,
    spec_errata=0,
    uintn_size=2,
    algorithms=(ccel.DigestSize(alg_id=ccel.TcgAlgorithm.SHA384, size=48),),
).to_bytes()


def cc_mr_for_pcr(pcr: int) -> int:
    """The TDX CC MR index a PCR index maps to (guest-api.md §7.2); ValueError outside 0..23."""
    if not 0 <= pcr <= MAX_PCR:
        msg = f"PCR index is {pcr!r}, expected 0..{MAX_PCR}"
        raise ValueError(msg)
    if pcr in (1, 7):
        return 1
    if 2 <= pcr <= 6:
        return 2
    if 8 <= pcr <= 15:
        return 3
    return 4


def rtmr_for_pcr(pcr: int) -> int:
    """The RTMR (0..3) a PCR index extends on TDX: CC MR index - 1."""
    return cc_mr_for_pcr(pcr) - 1


def extend_data(digest: bytes) -> bytes:
    """What is written to `rtmr<N>:sha384`: the digest zero-padded or truncated to exactly 48 bytes."""
    return digest[:EXTEND_LEN].ljust(EXTEND_LEN, b"\x00")


def extended(register: bytes, digest: bytes) -> bytes:
    """The register value after extending `digest`: SHA-384(register ‖ extend_data(digest))."""
    if len(register) != EXTEND_LEN:
        msg = f"register is {len(register)} bytes, expected {EXTEND_LEN}"
        raise ValueError(msg)
    return hashlib.sha384(register + extend_data(digest)).digest()


def measurement_entry(
    domain: str, operation: str, content: str, *, rtmr: int, alg: ccel.TcgAlgorithm = ccel.TcgAlgorithm.SHA384
) -> ccel.Event:
    """The AAEL entry for one event extended into RTMR `rtmr` (0..3); ValueError for text the format cannot carry."""
    if not 0 <= rtmr < ccel.RTMR_COUNT:
        msg = f"`rtmr` is {rtmr}, expected 0..{ccel.RTMR_COUNT - 1}"
        raise ValueError(msg)
    event = ccel.AaelEvent(domain=domain, operation=operation, content=content)
    size = len(event.text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        msg = f"event text is {size} bytes, expected at most {MAX_TEXT_BYTES}"
        raise ValueError(msg)
    return ccel.aael_entry(event, alg=alg, mr_index=rtmr + 1)


def parse_agent_log(data: bytes) -> tuple[ccel.Event, ...]:
    """The agent's log file (concatenated SHA-384 `TCG_PCR_EVENT2` entries, no header) as events."""
    if not data:
        return ()
    log = ccel.parse_event_log(_AGENT_HEADER + data)
    if log.tail:
        end = len(log.log_bytes()) - len(_AGENT_HEADER)
        msg = f"agent event log has 0x{len(log.tail):x} bytes after its last entry at 0x{end:x}, expected none"
        raise EvidenceParseError(msg, offset=end)
    return log.events


Source = Literal["firmware", "agent"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LogItem:
    """One event of a combined log, numbered from 1 in log order (the Spec-ID header is not counted)."""

    number: int
    source: Source
    event: ccel.Event

    def describe(self) -> str:
        aael = _safe_aael(self.event)
        text = None if aael is None else (aael.text if len(aael.text) <= _SHOWN else aael.text[:_SHOWN] + "...")
        what = repr(text) if text is not None else self.event.type_name
        return f"entry {self.number} ({self.source}, {what})"


def _safe_aael(event: ccel.Event) -> ccel.AaelEvent | None:
    try:
        return event.aael()
    except EvidenceParseError:
        return None


def items(firmware: Iterable[ccel.Event], agent: Iterable[ccel.Event]) -> tuple[LogItem, ...]:
    """Number firmware events, then the agent's entries, as one log."""
    out: list[LogItem] = []
    for source, events in (("firmware", firmware), ("agent", agent)):
        for event in events:
            out.append(LogItem(number=len(out) + 1, source=source, event=event))  # type: ignore[arg-type]
    return tuple(out)


def items_from_cc_eventlog(data: bytes) -> tuple[LogItem, ...]:
    """A `cc_eventlog` (evidence) as numbered items; AAEL-tagged events count as the agent's."""
    log = ccel.parse_event_log(data)
    return tuple(
        LogItem(number=i, source="agent" if _is_aael(e) else "firmware", event=e)
        for i, e in enumerate(log.events, start=1)
    )


def _is_aael(event: ccel.Event) -> bool:
    return (
        event.event_type == ccel.EV_EVENT_TAG
        and len(event.data) >= 4
        and int.from_bytes(event.data[:4], "little") == ccel.AAEL_TAG_ID
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Divergence:
    """The first place where log and registers disagree. `item` is None only for an empty register history."""

    rtmr: int
    item: LogItem | None
    reason: str

    def describe(self) -> str:
        where = self.item.describe() if self.item is not None else f"before the first RTMR{self.rtmr} entry"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rtmr": self.rtmr,
            "entry": None if self.item is None else self.item.number,
            "source": None if self.item is None else self.item.source,
            "reason": self.reason,
            "text": self.describe(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterReplay:
    rtmr: int
    entries: int
    replayed: bytes
    actual: bytes

    @property
    def matches(self) -> bool:
        return self.replayed == self.actual

    def to_dict(self) -> dict[str, Any]:
        return {
            "rtmr": self.rtmr,
            "entries": self.entries,
            "replayed": self.replayed.hex(),
            "actual": self.actual.hex(),
            "matches": self.matches,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayReport:
    registers: tuple[RegisterReplay, ...]
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "registers": [r.to_dict() for r in self.registers],
            "divergence": None if self.divergence is None else self.divergence.to_dict(),
        }


def _register_of(item: LogItem) -> int | None:
    """RTMR index an item extends, None if it extends nothing (EV_NO_ACTION, MRTD); raises if it cannot."""
    event = item.event
    if event.event_type == ccel.EV_NO_ACTION or event.mr_index == 0:
        return None
    if event.mr_index > ccel.RTMR_COUNT:
        msg = f"{item.describe()} MR index is {event.mr_index}, expected 0..{ccel.RTMR_COUNT}"
        raise EvidenceParseError(msg)
    if event.digest(ccel.TcgAlgorithm.SHA384) is None:
        msg = f"{item.describe()} has no SHA-384 digest, expected one to extend RTMR{event.mr_index - 1}"
        raise EvidenceParseError(msg)
    return event.mr_index - 1


def replay(
    log: Sequence[LogItem], actual: Sequence[bytes], *, registers: Iterable[int] = range(ccel.RTMR_COUNT)
) -> ReplayReport:
    """Replay `log` into RTMR0..3 and compare with `actual` (four 48-byte values); only `registers` are judged.

    Raises EvidenceParseError for an event that cannot be replayed at all (MR index > 4, no SHA-384 digest).
    """
    if len(actual) != ccel.RTMR_COUNT or any(len(a) != EXTEND_LEN for a in actual):
        msg = f"`actual` must be {ccel.RTMR_COUNT} values of {EXTEND_LEN} bytes"
        raise ValueError(msg)
    judged = sorted(set(registers))
    chains: list[list[bytes]] = [[_ZERO] for _ in range(ccel.RTMR_COUNT)]
    per_register: list[list[LogItem]] = [[] for _ in range(ccel.RTMR_COUNT)]
    bad_digest: list[Divergence] = []
    for item in log:
        rtmr = _register_of(item)
        if rtmr is None:
            continue
        digest = item.event.digest(ccel.TcgAlgorithm.SHA384)
        assert digest is not None  # checked by _register_of
        if _is_aael(item.event) and not item.event.digest_matches_event():
            bad_digest.append(Divergence(rtmr=rtmr, item=item, reason="its digest is not H(event data)"))
        chains[rtmr].append(extended(chains[rtmr][-1], digest))
        per_register[rtmr].append(item)
    results = tuple(
        RegisterReplay(rtmr=i, entries=len(per_register[i]), replayed=chains[i][-1], actual=actual[i]) for i in judged
    )
    found = [d for d in bad_digest if d.rtmr in judged]
    for result in results:
        if not result.matches:
            found.append(_locate(result.rtmr, chains[result.rtmr], per_register[result.rtmr], actual[result.rtmr]))
    first = min(found, key=lambda d: (d.item.number if d.item is not None else 0, d.rtmr), default=None)
    return ReplayReport(registers=results, divergence=first)


def _locate(rtmr: int, chain: list[bytes], entries: list[LogItem], actual: bytes) -> Divergence:
    """Where a mismatching register's history leaves the log."""
    for k in range(len(chain) - 1, -1, -1):
        if chain[k] == actual:
            # the register holds the replay of the first k entries: entry k+1 was logged but never extended
            return Divergence(
                rtmr=rtmr,
                item=entries[k],
                reason=f"logged but not in RTMR{rtmr}, which equals the replay of the {k} entries before it",
            )
    if not entries:
        return Divergence(rtmr=rtmr, item=None, reason=f"RTMR{rtmr} is {actual.hex()}, but the log has no entry for it")
    return Divergence(
        rtmr=rtmr,
        item=entries[0],
        reason=(
            f"RTMR{rtmr} is {actual.hex()}, which no prefix of its {len(entries)} log entries replays to: the register "
            "holds an extend the log does not record, or this entry differs from what was extended"
        ),
    )
