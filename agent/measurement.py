"""Runtime measurement (`ExtendRuntimeMeasurement`): which TEE can, the journal, the request rules. Orchestrator.

Reference semantics (guest-api.md §2.2, §7): `NOT_ENABLED` unless `[eventlog] enabled` (AA config
`[eventlog_config] enable_eventlog`); `NOT_SUPPORTED` where the TEE has no runtime registers this agent can extend
(SNP, the sample TEE, TDX without the Linux 6.16 measurement sysfs), never a crash; otherwise the event is logged
and extended and the answer is `OK`. `RegisterIndex` is a PCR index (absent → `init_pcr`, default 17), mapped to an
RTMR on TDX; the log entry names the register actually extended (the reference names `init_pcr`'s register even
when another one was extended: docs/decisions.md).

The log path: `[eventlog] path`, else `$AAEL_PATH` (as the reference), else /run/attestation-agent/eventlog.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import EvidenceParseError, InvalidRequest, MeasurementError
from agent.log import get_logger

if TYPE_CHECKING:  # the event log modules load only where runtime measurement is enabled
    from agent.config import Config
    from agent.tee import ccel
    from agent.tee.base import Attester
    from agent.tee.journal import Journal

__all__ = ["MeasurementResult", "RuntimeMeasurement", "build_measurement", "log_path"]

log = get_logger("agent.measurement")

AAEL_PATH_ENV = "AAEL_PATH"
DEFAULT_INIT_PCR = 17  # agent.tee.eventlog.DEFAULT_INIT_PCR (a test keeps them equal), without importing it


class MeasurementResult(enum.IntEnum):
    """`attestation_agent.RuntimeMeasurementResult`."""

    OK = 0
    NOT_SUPPORTED = 1
    NOT_ENABLED = 2


def log_path(config: Config, environ: Mapping[str, str]) -> str:
    """`[eventlog] path`, else `$AAEL_PATH`, else the reference's default."""
    if config.eventlog.path is not None:
        return config.eventlog.path
    env = environ.get(AAEL_PATH_ENV)
    if env:
        return env
    from agent.tee.journal import DEFAULT_LOG_PATH

    return DEFAULT_LOG_PATH


@dataclass(frozen=True, slots=True)
class RuntimeMeasurement:
    """What ExtendRuntimeMeasurement does here. `journal` None with `enabled`: not supported, for `reason`."""

    enabled: bool
    init_pcr: int = DEFAULT_INIT_PCR
    journal: Journal | None = None
    reason: str = ""

    async def extend(self, domain: str, operation: str, content: str, register_index: int | None) -> MeasurementResult:
        if not self.enabled:
            return MeasurementResult.NOT_ENABLED
        if self.journal is None:
            return MeasurementResult.NOT_SUPPORTED
        pcr = self.init_pcr if register_index is None else register_index
        from agent.tee import eventlog

        try:
            rtmr = eventlog.rtmr_for_pcr(pcr)
            entry = eventlog.measurement_entry(domain, operation, content, rtmr=rtmr)
        except ValueError as exc:
            msg = f"`RegisterIndex` or event text is invalid: {exc}"
            raise InvalidRequest(msg) from exc
        await asyncio.to_thread(self.journal.extend, entry)
        log.info("measurement.extended", pcr=pcr, rtmr=rtmr, domain=domain, operation=operation)
        return MeasurementResult.OK

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()


def build_measurement(
    config: Config, attester: Attester, environ: Mapping[str, str] | None = None
) -> RuntimeMeasurement:
    """Open (and recover) the journal when runtime measurement is enabled and the TEE supports it. Blocking.

    A TDX attester gets the journal, so its evidence carries the agent's entries in `cc_eventlog`.
    Raises MeasurementError when the log and the registers cannot be reconciled: the agent must not start.
    """
    settings = config.eventlog
    tee = attester.tee
    if not settings.enabled:
        return RuntimeMeasurement(enabled=False, init_pcr=settings.init_pcr)
    from agent.tee.journal import Journal
    from agent.tee.registry import support

    factory = support(tee).runtime_registers
    if factory is None:
        reason = f"the {tee} TEE has no runtime measurement registers this agent can extend"
        log.warning("measurement.unsupported", tee=tee, reason=reason)
        return RuntimeMeasurement(enabled=True, init_pcr=settings.init_pcr, reason=reason)
    registers = factory(config)
    missing = registers.missing()
    if missing is not None:
        log.warning("measurement.unsupported", tee=tee, reason=missing)
        return RuntimeMeasurement(enabled=True, init_pcr=settings.init_pcr, reason=missing)
    path = log_path(config, os.environ if environ is None else environ)
    journal = Journal(path, registers, firmware=firmware_events(config.tee_paths.ccel_data))
    recovery = journal.open()
    from agent.tee.tdx_attester import TdxAttester  # only TDX evidence carries the log; imported when used

    if isinstance(attester, TdxAttester):
        attester.use_agent_log(journal)
    log.info(
        "measurement.ready",
        path=path,
        init_pcr=settings.init_pcr,
        entries=recovery.entries,
        pending=recovery.pending,
        detail=recovery.detail or None,
    )
    return RuntimeMeasurement(enabled=True, init_pcr=settings.init_pcr, journal=journal)


def firmware_events(ccel_path: str) -> tuple[ccel.Event, ...]:
    """The firmware's CCEL events (none when the file does not exist); MeasurementError if it does not parse."""
    from agent.tee import ccel
    from agent.tee._common import read_optional

    raw = read_optional(Path(ccel_path), "the CCEL event log")
    if raw is None:
        return ()
    try:
        return ccel.parse_event_log(ccel.trim_ccel(raw)).events
    except EvidenceParseError as exc:
        msg = f"the CCEL event log `{ccel_path}` does not parse: {exc}"
        raise MeasurementError(msg) from exc
