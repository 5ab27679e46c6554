"""The SEV-SNP attester: reports from configfs-tsm, else the sev-guest ioctls. Orchestrator.

Evidence is the reference shape (guest-api.md §5.2), the `sev` crate's serde form Trustee parses::

    {"attestation_report": {...}, "cert_chain": [{"cert_type": "VCEK", "data": [...]}, ...] | null}

- configfs-tsm first (provider `sev_guest`, `privlevel` = the VMPL, `auxblob` = the certificate table). When
  configfs-tsm is not usable (not there, no provider, another provider, no `privlevel`), `SNP_GET_EXT_REPORT` on
  `/dev/sev-guest`; when that ioctl is refused before reaching the firmware (ENOTTY/EINVAL) or the host's
  certificates do not fit, `SNP_GET_REPORT` without certificates.
- `cert_chain` is null when the host supplies no certificates (Trustee then fetches the VCEK from AMD KDS).
- VMPL 0 by default (`snp.vmpl`); Trustee's verifier accepts only VMPL 0.
- Before returning, the report is parsed and its REPORT_DATA and VMPL compared with what was asked for
  (`EvidenceMismatch` otherwise).

Blocking calls run in `asyncio.to_thread`. The ioctls are serialised per device path: a failed guest request can
make the driver disable the VMPCK, so the agent never has two in flight.
"""

from __future__ import annotations

import asyncio
import errno
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from agent.config import TeePaths
from agent.errors import DeviceError, EvidenceMismatch, EvidenceParseError, TeeUnavailable
from agent.initdata import binding_value
from agent.log import get_logger
from agent.tee import _device, snp, tsm
from agent.tee import _uapi as uapi
from agent.tee._common import pad_report_data, require_init_data

__all__ = ["HOST_DATA_LEN", "SnpAttester", "SnpReport"]

log = get_logger("agent.tee.snp")

HOST_DATA_LEN: Final = 32

GetExtReport = Callable[..., tuple[bytes, bytes]]
GetReport = Callable[..., bytes]

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _device_lock(path: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(path, threading.Lock())


@dataclass(frozen=True, slots=True, kw_only=True)
class SnpReport:
    """A parsed report, its certificate table (None when the host gave none), and the interface used."""

    report: snp.AttestationReport
    certs: snp.CertTable | None
    source: str


def _ext_report_refused(exc: DeviceError) -> bool:
    """SNP_GET_EXT_REPORT failed without touching the firmware, so SNP_GET_REPORT is worth one try."""
    if exc.vmm_error == uapi.SNP_GUEST_VMM_ERR_INVALID_LEN and not exc.fw_error:
        return True  # the host's certificates do not fit any buffer we may pass
    no_fw_call = exc.fw_error in (None, 0, uapi.SNP_IOCTL_NO_FW_CALL)
    return exc.errno in (errno.ENOTTY, errno.EINVAL) and no_fw_call and not exc.vmm_error


def _cert_table(raw: bytes | None, source: str) -> snp.CertTable | None:
    if not raw or not any(raw):
        return None
    try:
        table = snp.parse_cert_table(raw)
    except EvidenceParseError as exc:
        msg = f"the SNP certificate table from {source} does not parse: {exc}"
        raise EvidenceParseError(msg, offset=exc.offset) from exc
    return table if table.entries else None


class SnpAttester:
    """AMD SEV-SNP evidence."""

    def __init__(
        self,
        paths: TeePaths,
        *,
        vmpl: int = 0,
        fsops: tsm.FsOps | None = None,
        get_ext_report: GetExtReport = _device.snp_get_ext_report,
        get_report: GetReport = _device.snp_get_report,
    ) -> None:
        if not 0 <= vmpl <= tsm.PRIVLEVEL_MAX:
            msg = f"`vmpl` is {vmpl}, expected 0..{tsm.PRIVLEVEL_MAX}"
            raise ValueError(msg)
        self._paths = paths
        self._vmpl = vmpl
        self._fsops = fsops
        self._get_ext_report = get_ext_report
        self._get_report = get_report

    @property
    def tee(self) -> str:
        return "snp"

    @property
    def vmpl(self) -> int:
        return self._vmpl

    async def get_evidence(self, runtime_data: bytes) -> bytes:
        inblob = pad_report_data(runtime_data, "SEV-SNP")
        fetched = await asyncio.to_thread(self.fetch, inblob, want_certs=True)
        evidence = snp.snp_evidence(fetched.report, fetched.certs)
        return json.dumps(evidence, separators=(",", ":")).encode()

    async def bind_init_data(self, digest: bytes) -> None:
        expected = binding_value(digest, HOST_DATA_LEN)
        fetched = await asyncio.to_thread(self.fetch, bytes(64), want_certs=False)
        require_init_data("HOST_DATA", expected, fetched.report.host_data)
        log.info("snp.initdata.bound", source=fetched.source)

    # -- blocking parts (worker threads) --

    def fetch(self, inblob: bytes, *, want_certs: bool) -> SnpReport:
        """A fresh report for the 64-byte `inblob`, self-checked; certificates when `want_certs`."""
        try:
            result = tsm.get_report(
                inblob,
                root=self._paths.tsm_report_dir,
                expected_provider=tsm.PROVIDER_SNP,
                privlevel=self._vmpl,
                want_auxblob=want_certs,
                fsops=self._fsops,
            )
        except TeeUnavailable as tsm_exc:
            log.debug("snp.configfs.unusable", reason=str(tsm_exc))
            try:
                raw, certs_raw, source = self._from_device(inblob, want_certs=want_certs)
            except TeeUnavailable as dev_exc:
                msg = f"no SEV-SNP interface is usable: configfs-tsm: {tsm_exc}; ioctl: {dev_exc}"
                raise TeeUnavailable(msg) from dev_exc
        else:
            raw, certs_raw, source = result.outblob, result.auxblob, f"configfs-tsm {self._paths.tsm_report_dir}"
        report = self._check(raw, inblob, source)
        return SnpReport(report=report, certs=_cert_table(certs_raw, source), source=source)

    def _from_device(self, inblob: bytes, *, want_certs: bool) -> tuple[bytes, bytes | None, str]:
        device = self._paths.sev_guest_device
        with _device_lock(device):
            if want_certs:
                try:
                    raw, table = self._get_ext_report(inblob, vmpl=self._vmpl, path=device)
                except DeviceError as exc:
                    if not _ext_report_refused(exc):
                        raise
                    log.warning("snp.ext_report.fallback", reason=str(exc), device=device)
                else:
                    return raw, table, f"SNP_GET_EXT_REPORT on {device}"
            raw = self._get_report(inblob, vmpl=self._vmpl, path=device)
            return raw, None, f"SNP_GET_REPORT on {device}"

    def _check(self, raw: bytes, inblob: bytes, source: str) -> snp.AttestationReport:
        try:
            report = snp.parse_report(raw)
        except EvidenceParseError as exc:
            msg = f"the SNP report from {source} does not parse: {exc}"
            raise EvidenceParseError(msg, offset=exc.offset) from exc
        if report.report_data != inblob:
            msg = (
                f"the SNP report's REPORT_DATA is {report.report_data.hex()}, expected {inblob.hex()} "
                f"(the runtime data asked for; from {source})"
            )
            raise EvidenceMismatch(msg)
        if report.vmpl != self._vmpl:
            msg = f"the SNP report's VMPL is {report.vmpl}, expected {self._vmpl} (from {source})"
            raise EvidenceMismatch(msg)
        return report
