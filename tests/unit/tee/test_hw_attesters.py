"""The TDX and SNP attesters against the in-memory configfs-tsm model and injected device functions."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.config import TeePaths
from agent.errors import DeviceError, EvidenceMismatch, InvalidRequest, TeeUnavailable
from agent.tee import _uapi as uapi
from agent.tee import ccel, snp, tdx
from agent.tee.snp_attester import SnpAttester
from agent.tee.tdx_attester import TdxAttester
from tests.fakes.tsmfs import (
    DEFAULT_CERT_TABLE,
    DEFAULT_SNP_TEMPLATE,
    DEFAULT_TDX_TEMPLATE,
    InMemoryTsm,
    TsmFsOptions,
    snp_report_with,
)
from tests.paths import VECTORS_DIR as VECTORS

GCP = VECTORS / "hw" / "tdx" / "ccel_gcp_cos113"
TD_REPORT = VECTORS / "hw" / "tdx" / "tdreport_v1_tdx15_guestcomponents.bin"
DIGEST = bytes(range(1, 49))  # a SHA-384-sized runtime data digest
PADDED = DIGEST + bytes(16)


class TamperingFs:
    """An FsOps that passes through to `InMemoryTsm` but replaces what `outblob` reads return."""

    def __init__(self, inner: InMemoryTsm, transform: Any) -> None:
        self.inner = inner
        self.transform = transform

    def mkdir(self, path: Path) -> None:
        self.inner.mkdir(path)

    def rmdir(self, path: Path) -> None:
        self.inner.rmdir(path)

    def read(self, path: Path) -> bytes:
        data = self.inner.read(path)
        return self.transform(data) if path.name == "outblob" else data

    def write(self, path: Path, data: bytes) -> None:
        self.inner.write(path, data)

    def is_dir(self, path: Path) -> bool:
        return self.inner.is_dir(path)


def paths_for(fs: InMemoryTsm, tmp_path: Path, **changes: str) -> TeePaths:
    """Paths where only the in-memory configfs exists; everything else points at nothing under tmp_path."""
    base = TeePaths(
        tsm_report_dir=str(fs.root),
        tdx_guest_device=str(tmp_path / "dev" / "tdx_guest"),
        sev_guest_device=str(tmp_path / "dev" / "sev-guest"),
        sev_guest_platform_dir=str(tmp_path / "platform" / "sev-guest"),
        tdx_measurements_dir=str(tmp_path / "measurements"),
        ccel_data=str(tmp_path / "CCEL"),
    )
    return replace(base, **changes)


def no_device(*_args: object, **_kwargs: object) -> Any:
    msg = "`/dev/x` is not available (ENOENT): not a guest, or the driver is not loaded"
    raise TeeUnavailable(msg)


# --- TDX -------------------------------------------------------------------------------------------------------


class TestTdxEvidence:
    async def test_shape_without_ccel(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        evidence = await TdxAttester(paths_for(fs, tmp_path), fsops=fs).get_evidence(DIGEST)
        assert evidence.startswith(b'{"cc_eventlog":null,"quote":"')
        obj = json.loads(evidence)
        assert list(obj) == ["cc_eventlog", "quote"]
        raw = base64.b64decode(obj["quote"], validate=True)
        assert tdx.parse_quote(raw).body.report_data == PADDED
        assert len(raw) == len(DEFAULT_TDX_TEMPLATE.read_bytes())
        assert fs.entries() == []  # the configfs entry was removed

    async def test_cc_eventlog_is_trimmed_ccel_plus_end_marker(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        raw_ccel = (GCP / "ccel_data.bin").read_bytes()
        paths = paths_for(fs, tmp_path, ccel_data=str(GCP / "ccel_data.bin"))
        obj = json.loads(await TdxAttester(paths, fsops=fs).get_evidence(b"x"))
        eventlog = base64.b64decode(obj["cc_eventlog"], validate=True)
        assert eventlog == ccel.trim_ccel(raw_ccel) + b"\xff" * 8
        assert len(eventlog) < len(raw_ccel)
        assert len(ccel.parse_event_log(eventlog).events) == 43

    @pytest.mark.parametrize("size", [0, 1, 48, 64])
    async def test_runtime_data_up_to_64_bytes_is_zero_padded(self, tmp_path: Path, size: int) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        data = bytes([0xAB]) * size
        obj = json.loads(await TdxAttester(paths_for(fs, tmp_path), fsops=fs).get_evidence(data))
        quote = tdx.parse_quote(base64.b64decode(obj["quote"]))
        assert quote.body.report_data == data + bytes(64 - size)

    async def test_runtime_data_over_64_bytes_is_refused_before_any_io(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        with pytest.raises(InvalidRequest, match="65 bytes, expected at most 64 for TDX"):
            await TdxAttester(paths_for(fs, tmp_path), fsops=fs).get_evidence(bytes(65))
        assert fs.calls == []

    async def test_self_check_rejects_a_quote_for_other_report_data(self, tmp_path: Path) -> None:
        inner = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        fs = TamperingFs(inner, lambda q: q[:0x238] + b"\xee" * 64 + q[0x238 + 64 :])
        attester = TdxAttester(paths_for(inner, tmp_path), fsops=fs)
        with pytest.raises(EvidenceMismatch, match=r"REPORTDATA is eeee.*expected 0102"):
            await attester.get_evidence(DIGEST)

    async def test_no_configfs_says_quotes_need_it(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest", layout="no_tsm"))
        with pytest.raises(TeeUnavailable) as info:
            await TdxAttester(paths_for(fs, tmp_path), fsops=fs).get_evidence(DIGEST)
        message = str(info.value)
        assert message.startswith("TDX quotes come only from configfs-tsm")
        assert ">= 6.7" in message
        assert "\n" not in message

    async def test_wrong_provider(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        with pytest.raises(TeeUnavailable, match="provider is `sev_guest`, expected `tdx_guest`"):
            await TdxAttester(paths_for(fs, tmp_path), fsops=fs).get_evidence(DIGEST)

    async def test_concurrent_requests_get_their_own_quotes(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        attester = TdxAttester(paths_for(fs, tmp_path), fsops=fs)
        datas = [bytes([i]) * 64 for i in range(8)]
        results = await asyncio.gather(*(attester.get_evidence(d) for d in datas))
        for data, evidence in zip(datas, results, strict=True):
            quote = tdx.parse_quote(base64.b64decode(json.loads(evidence)["quote"]))
            assert quote.body.report_data == data
        assert fs.entries() == []


class TestTdxInitData:
    def write_sysfs(self, folder: Path, mrconfigid: bytes) -> None:
        folder.mkdir()
        (folder / "mrconfigid").write_bytes(mrconfigid)
        (folder / "mrtd:sha384").write_bytes(b"\x06" * 48)
        for i in range(4):
            (folder / f"rtmr{i}:sha384").write_bytes(bytes([i]) * 48)

    async def test_sysfs_match_and_mismatch(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        digest = bytes(range(32))  # a SHA-256 digest is zero-padded to 48
        self.write_sysfs(tmp_path / "measurements", digest + bytes(16))
        attester = TdxAttester(paths_for(fs, tmp_path), fsops=fs, get_report0=no_device)
        await attester.bind_init_data(digest)
        registers = attester.registers()
        assert registers.source.startswith("sysfs ")
        assert registers.rtmrs == tuple(bytes([i]) * 48 for i in range(4))
        other = b"\x99" * 32
        with pytest.raises(EvidenceMismatch) as info:
            await attester.bind_init_data(other)
        message = str(info.value)
        assert f"MRCONFIGID is {(digest + bytes(16)).hex()}, expected {(other + bytes(16)).hex()}" in message
        assert "\n" not in message

    async def test_long_digest_is_truncated_to_48(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        digest = bytes(range(64))  # SHA-512
        self.write_sysfs(tmp_path / "measurements", digest[:48])
        await TdxAttester(paths_for(fs, tmp_path), fsops=fs, get_report0=no_device).bind_init_data(digest)

    async def test_td_report_when_sysfs_is_missing(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        report = TD_REPORT.read_bytes()
        calls: list[tuple[bytes, object]] = []

        def get_report0(report_data: bytes, *, path: object) -> bytes:
            calls.append((report_data, path))
            return report

        paths = paths_for(fs, tmp_path)
        attester = TdxAttester(paths, fsops=fs, get_report0=get_report0)
        mrconfigid = tdx.parse_td_report(report).td_info.mr_config_id
        await attester.bind_init_data(mrconfigid)
        assert calls == [(bytes(64), paths.tdx_guest_device)]
        assert attester.registers().source.startswith("TD report (TDX_CMD_GET_REPORT0")
        with pytest.raises(EvidenceMismatch, match="MRCONFIGID"):
            await attester.bind_init_data(b"\x01" * 48)

    async def test_neither_sysfs_nor_device(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        attester = TdxAttester(paths_for(fs, tmp_path), fsops=fs, get_report0=no_device)
        with pytest.raises(TeeUnavailable, match=r"sysfs measurements .* do not exist \(Linux < 6.16\)"):
            await attester.bind_init_data(b"\x01" * 32)

    async def test_short_sysfs_register(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        self.write_sysfs(tmp_path / "measurements", b"\x01" * 47)
        with pytest.raises(DeviceError, match="47 bytes, expected 48"):
            await TdxAttester(paths_for(fs, tmp_path), fsops=fs).bind_init_data(b"\x01")


# --- SNP -------------------------------------------------------------------------------------------------------


class FakeSevGuest:
    """Injected `snp_get_ext_report` / `snp_get_report` with call records and optional failures."""

    def __init__(self, *, certs: bytes = b"", ext_error: DeviceError | None = None, host_data: bytes = bytes(32)):
        self.template = bytearray(DEFAULT_SNP_TEMPLATE.read_bytes())
        self.template[0xC0:0xE0] = host_data
        self.certs = certs
        self.ext_error = ext_error
        self.calls: list[str] = []
        self.active = 0
        self.max_active = 0
        self.report_vmpl: int | None = None
        self._lock = threading.Lock()

    def _enter(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(0.01)
        with self._lock:
            self.active -= 1

    def report(self, user_data: bytes, vmpl: int) -> bytes:
        vmpl_out = vmpl if self.report_vmpl is None else self.report_vmpl
        return snp_report_with(bytes(self.template), user_data, vmpl_out)

    def get_ext_report(self, user_data: bytes, *, vmpl: int, path: object) -> tuple[bytes, bytes]:
        self._enter("ext")
        if self.ext_error is not None:
            raise self.ext_error
        return self.report(user_data, vmpl), self.certs.ljust(2 * 4096, b"\x00")

    def get_report(self, user_data: bytes, *, vmpl: int, path: object) -> bytes:
        self._enter("report")
        return self.report(user_data, vmpl)


def snp_attester(fs: InMemoryTsm, tmp_path: Path, dev: FakeSevGuest | None = None, vmpl: int = 0) -> SnpAttester:
    dev = dev or FakeSevGuest()
    return SnpAttester(
        paths_for(fs, tmp_path),
        vmpl=vmpl,
        fsops=fs,
        get_ext_report=dev.get_ext_report,
        get_report=dev.get_report,
    )


class TestSnpEvidence:
    async def test_configfs_evidence_is_snp_evidence(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        dev = FakeSevGuest()
        evidence = await snp_attester(fs, tmp_path, dev).get_evidence(DIGEST)
        obj = json.loads(evidence)
        assert list(obj) == ["attestation_report", "cert_chain"]
        report = snp.report_from_sev_json(obj["attestation_report"])
        assert (report.report_data, report.vmpl) == (PADDED, 0)
        table = snp.parse_cert_table(DEFAULT_CERT_TABLE.read_bytes())
        assert obj == json.loads(json.dumps(snp.snp_evidence(report, table)))
        assert evidence == json.dumps(snp.snp_evidence(report, table), separators=(",", ":")).encode()
        assert [c["cert_type"] for c in obj["cert_chain"]] == ["VCEK", "ASK", "ARK"]
        assert dev.calls == []  # configfs worked, no ioctl

    async def test_configfs_without_host_certificates_gives_null(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", certs=False))
        obj = json.loads(await snp_attester(fs, tmp_path).get_evidence(DIGEST))
        assert obj["cert_chain"] is None

    async def test_configured_vmpl_is_written_as_privlevel(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", privlevel_floor=1))
        obj = json.loads(await snp_attester(fs, tmp_path, vmpl=2).get_evidence(DIGEST))
        assert obj["attestation_report"]["vmpl"] == 2

    async def test_vmpl_below_the_floor_is_a_clear_error(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", privlevel_floor=1))
        with pytest.raises(DeviceError, match="`privlevel` is 0, expected at least `privlevel_floor` 1"):
            await snp_attester(fs, tmp_path).get_evidence(DIGEST)

    async def test_ioctl_fallback_without_configfs(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        dev = FakeSevGuest(certs=DEFAULT_CERT_TABLE.read_bytes())
        obj = json.loads(await snp_attester(fs, tmp_path, dev).get_evidence(DIGEST))
        assert dev.calls == ["ext"]
        assert [c["cert_type"] for c in obj["cert_chain"]] == ["VCEK", "ASK", "ARK"]
        assert bytes(obj["attestation_report"]["report_data"]) == PADDED

    async def test_ioctl_without_host_certificates_gives_null(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        obj = json.loads(await snp_attester(fs, tmp_path).get_evidence(DIGEST))
        assert obj["cert_chain"] is None

    @pytest.mark.parametrize(
        "error",
        [
            DeviceError("refused", errno=errno.ENOTTY, fw_error=uapi.SNP_IOCTL_NO_FW_CALL, vmm_error=0),
            DeviceError("refused", errno=errno.EINVAL, fw_error=uapi.SNP_IOCTL_NO_FW_CALL, vmm_error=0),
            DeviceError("too big", errno=errno.EIO, fw_error=0, vmm_error=uapi.SNP_GUEST_VMM_ERR_INVALID_LEN),
        ],
    )
    async def test_ext_report_refused_falls_back_to_get_report(self, tmp_path: Path, error: DeviceError) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        dev = FakeSevGuest(ext_error=error)
        obj = json.loads(await snp_attester(fs, tmp_path, dev).get_evidence(DIGEST))
        assert dev.calls == ["ext", "report"]
        assert obj["cert_chain"] is None

    async def test_firmware_error_is_not_retried(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        error = DeviceError("SNP_GET_EXT_REPORT failed: firmware error 0x16", errno=errno.EIO, fw_error=0x16)
        dev = FakeSevGuest(ext_error=error)
        with pytest.raises(DeviceError, match="firmware error 0x16"):
            await snp_attester(fs, tmp_path, dev).get_evidence(DIGEST)
        assert dev.calls == ["ext"]

    async def test_nothing_usable_names_both_interfaces(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        attester = SnpAttester(paths_for(fs, tmp_path), fsops=fs, get_ext_report=no_device, get_report=no_device)
        with pytest.raises(TeeUnavailable) as info:
            await attester.get_evidence(DIGEST)
        message = str(info.value)
        assert message.startswith("no SEV-SNP interface is usable: configfs-tsm: ")
        assert "; ioctl: `/dev/x` is not available" in message

    async def test_self_check_report_data(self, tmp_path: Path) -> None:
        inner = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        fs = TamperingFs(inner, lambda r: r[:0x50] + b"\x01" * 64 + r[0x90:])
        attester = SnpAttester(paths_for(inner, tmp_path), fsops=fs)
        with pytest.raises(EvidenceMismatch, match=r"REPORT_DATA is 0101.*expected 0102"):
            await attester.get_evidence(DIGEST)

    async def test_self_check_vmpl(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        dev = FakeSevGuest()
        dev.report_vmpl = 1
        with pytest.raises(EvidenceMismatch, match="VMPL is 1, expected 0"):
            await snp_attester(fs, tmp_path, dev).get_evidence(DIGEST)

    async def test_runtime_data_bounds(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        attester = snp_attester(fs, tmp_path)
        obj = json.loads(await attester.get_evidence(bytes(range(64))))
        assert bytes(obj["attestation_report"]["report_data"]) == bytes(range(64))
        with pytest.raises(InvalidRequest, match="at most 64 for SEV-SNP"):
            await attester.get_evidence(bytes(65))

    async def test_ioctls_are_serialised_per_device(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        dev = FakeSevGuest()
        attester = snp_attester(fs, tmp_path, dev)
        datas = [bytes([i]) * 64 for i in range(6)]
        results = await asyncio.gather(*(attester.get_evidence(d) for d in datas))
        assert dev.max_active == 1
        for data, evidence in zip(datas, results, strict=True):
            assert bytes(json.loads(evidence)["attestation_report"]["report_data"]) == data

    def test_vmpl_range(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="`vmpl` is 4"):
            SnpAttester(TeePaths(), vmpl=4)


class TestSnpInitData:
    async def test_host_data_match_and_mismatch(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest", layout="no_tsm"))
        digest = bytes(range(48))  # SHA-384: truncated to 32
        dev = FakeSevGuest(host_data=digest[:32])
        attester = snp_attester(fs, tmp_path, dev)
        await attester.bind_init_data(digest)
        assert dev.calls == ["report"]  # a fresh plain report, no certificates needed
        with pytest.raises(EvidenceMismatch) as info:
            await attester.bind_init_data(b"\x07" * 20)
        message = str(info.value)
        wanted = b"\x07" * 20 + bytes(12)
        assert f"HOST_DATA is {digest[:32].hex()}, expected {wanted.hex()}" in message

    async def test_through_configfs(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        host_data = snp.parse_report(DEFAULT_SNP_TEMPLATE.read_bytes()).host_data
        await snp_attester(fs, tmp_path).bind_init_data(host_data)
        with pytest.raises(EvidenceMismatch, match="HOST_DATA"):
            await snp_attester(fs, tmp_path).bind_init_data(b"\xff" * 32)
