"""The TDX attester: TD quotes from configfs-tsm, the CCEL event log, MRCONFIGID for initdata. Orchestrator.

Evidence is the reference shape (guest-api.md §5.2), compact JSON with the keys in this order::

    {"cc_eventlog": "<base64 std>" | null, "quote": "<base64 std of the raw TD quote>"}

- The quote comes only from configfs-tsm (provider `tdx_guest`); mainline kernels have no quote ioctl.
- `cc_eventlog` is the CCEL ACPI data trimmed at its end marker, then the agent's runtime-measurement entries
  (when an event log is attached with `use_agent_log`), then 8 x 0xFF; null when there is neither. The quote is
  taken under the event log's lock, so no extend falls between the quote's RTMRs and the log read with it.
- Before returning, the quote is parsed and its REPORTDATA compared with the padded runtime data
  (`EvidenceMismatch` otherwise).
- MRCONFIGID and the RTMRs come from the Linux 6.16+ sysfs measurement files when that directory exists, else from
  a TD report (`TDX_CMD_GET_REPORT0` on `/dev/tdx_guest`).

Blocking calls run in `asyncio.to_thread`; each quote request uses its own configfs entry, so concurrent requests
do not share state.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

from agent.config import TeePaths
from agent.errors import DeviceError, EvidenceMismatch, EvidenceParseError, TeeUnavailable
from agent.initdata import binding_value
from agent.log import get_logger
from agent.tee import _device, ccel, tdx, tsm
from agent.tee._common import pad_report_data, read_optional, require_init_data

__all__ = ["MR_LEN", "TdxAttester", "TdxRegisters"]

log = get_logger("agent.tee.tdx")

MR_LEN: Final = 48
_SYSFS_MRCONFIGID: Final = "mrconfigid"
_SYSFS_MRTD: Final = "mrtd:sha384"
_SYSFS_RTMR: Final = "rtmr{}:sha384"

GetReport0 = Callable[..., bytes]
T = TypeVar("T")


class AgentLog(Protocol):
    """The agent's runtime event log (`agent.tee.journal.Journal`)."""

    def run_locked(self, fn: Callable[[], T]) -> tuple[T, bytes]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxRegisters:
    """MRTD, MRCONFIGID and RTMR0..3 as read now, and where they were read from."""

    source: str
    mr_td: bytes
    mr_config_id: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]

    def to_dict(self) -> dict[str, str]:
        out = {"source": self.source, "mr_td": self.mr_td.hex(), "mr_config_id": self.mr_config_id.hex()}
        out.update({f"rtmr{i}": value.hex() for i, value in enumerate(self.rtmrs)})
        return out


class TdxAttester:
    """Intel TDX evidence through configfs-tsm."""

    def __init__(
        self,
        paths: TeePaths,
        *,
        fsops: tsm.FsOps | None = None,
        get_report0: GetReport0 = _device.tdx_get_report0,
    ) -> None:
        self._paths = paths
        self._fsops = fsops
        self._get_report0 = get_report0
        self._agent_log: AgentLog | None = None

    def use_agent_log(self, agent_log: AgentLog) -> None:
        """Append this runtime event log's entries to `cc_eventlog` from now on."""
        self._agent_log = agent_log

    @property
    def tee(self) -> str:
        return "tdx"

    async def get_evidence(self, runtime_data: bytes) -> bytes:
        inblob = pad_report_data(runtime_data, "TDX")
        return await asyncio.to_thread(self._evidence, inblob)

    async def bind_init_data(self, digest: bytes) -> None:
        expected = binding_value(digest, MR_LEN)
        registers = await asyncio.to_thread(self.registers)
        require_init_data("MRCONFIGID", expected, registers.mr_config_id)
        log.info("tdx.initdata.bound", source=registers.source)

    # -- blocking parts (worker threads) --

    def _evidence(self, inblob: bytes) -> bytes:
        root = self._paths.tsm_report_dir

        def fetch() -> tsm.TsmReport:
            return tsm.get_report(inblob, root=root, expected_provider=tsm.PROVIDER_TDX, fsops=self._fsops)

        try:
            if self._agent_log is None:
                report, aael = fetch(), None
            else:
                report, aael = self._agent_log.run_locked(fetch)
        except TeeUnavailable as exc:
            msg = f"TDX quotes come only from configfs-tsm, which is not usable: {exc}"
            raise TeeUnavailable(msg) from exc
        try:
            quote = tdx.parse_quote(report.outblob)
        except EvidenceParseError as exc:
            msg = f"the TD quote from configfs-tsm ({len(report.outblob)} bytes) does not parse: {exc}"
            raise EvidenceParseError(msg, offset=exc.offset) from exc
        if quote.body.report_data != inblob:
            msg = (
                f"the TD quote's REPORTDATA is {quote.body.report_data.hex()}, expected {inblob.hex()} "
                "(the runtime data asked for): the quote does not belong to this request"
            )
            raise EvidenceMismatch(msg)
        eventlog = self._cc_eventlog(aael or None)
        evidence = {
            "cc_eventlog": None if eventlog is None else base64.b64encode(eventlog).decode("ascii"),
            "quote": base64.b64encode(report.outblob).decode("ascii"),
        }
        return json.dumps(evidence, separators=(",", ":")).encode()

    def _cc_eventlog(self, aael: bytes | None) -> bytes | None:
        path = self._paths.ccel_data
        raw = read_optional(path, "the CCEL event log")
        try:
            return ccel.build_cc_eventlog(raw, aael)
        except EvidenceParseError as exc:
            msg = f"the CCEL event log `{path}` does not parse: {exc}"
            raise EvidenceParseError(msg, offset=exc.offset) from exc

    def registers(self) -> TdxRegisters:
        """MRTD, MRCONFIGID and RTMRs: sysfs (Linux >= 6.16) when present, else a TD report."""
        folder = Path(self._paths.tdx_measurements_dir)
        if folder.is_dir():
            return self._sysfs_registers(folder)
        device = self._paths.tdx_guest_device
        try:
            raw = self._get_report0(bytes(64), path=device)
        except TeeUnavailable as exc:
            msg = (
                f"cannot read MRCONFIGID/RTMRs: the sysfs measurements `{folder}` do not exist (Linux < 6.16) and {exc}"
            )
            raise TeeUnavailable(msg) from exc
        report = tdx.parse_td_report(raw)
        info = report.td_info
        return TdxRegisters(
            source=f"TD report (TDX_CMD_GET_REPORT0 on {device})",
            mr_td=info.mr_td,
            mr_config_id=info.mr_config_id,
            rtmrs=info.rtmrs,
        )

    def _sysfs_registers(self, folder: Path) -> TdxRegisters:
        def read(name: str) -> bytes:
            path = folder / name
            value = read_optional(path, "the TDX measurement register", max_bytes=4096)
            if value is None:
                msg = f"TDX measurement register `{path}` does not exist although `{folder}` does"
                raise DeviceError(msg)
            if len(value) != MR_LEN:
                msg = f"TDX measurement register `{path}` is {len(value)} bytes, expected {MR_LEN}"
                raise DeviceError(msg)
            return value

        rtmrs = tuple(read(_SYSFS_RTMR.format(i)) for i in range(ccel.RTMR_COUNT))
        return TdxRegisters(
            source=f"sysfs {os.fspath(folder)}",
            mr_td=read(_SYSFS_MRTD),
            mr_config_id=read(_SYSFS_MRCONFIGID),
            rtmrs=(rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3]),
        )
