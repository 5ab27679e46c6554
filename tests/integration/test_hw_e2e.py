"""End to end on emulated hardware: the daemon attests to the dev KBS with TDX and SNP evidence and fetches a secret.

- TDX: configfs-tsm emulated by tsmfs (FUSE), with the GCP CCEL whose replay matches the quote template's RTMRs.
- SNP: configfs-tsm emulated by tsmfs; and separately the ioctl fallback under the LD_PRELOAD shim, no configfs.
`tee --probe` and `evidence --decode` are in test_hw_cli.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cvm_tools.devkbs.server import DevKbsServer

from agent.tee import snp
from tests.fakes.tsmfs import DEFAULT_CERT_TABLE, MountedTsm, TsmFsOptions, mounted_tsm
from tests.integration.conftest import SECRET
from tests.integration.hw_fixtures import HwDaemon, cli, path_flags
from tests.paths import VECTORS_DIR as VECTORS

if TYPE_CHECKING:
    from tests.fakes.shim import GuestDevShim

pytest_plugins = ("tests.fakes.shim",)
pytestmark = pytest.mark.integration

GCP = VECTORS / "hw" / "tdx" / "ccel_gcp_cos113"


@pytest.fixture
def tdx_tsm(tmp_path: Path) -> Iterator[MountedTsm]:
    options = TsmFsOptions(provider="tdx_guest", tdx_template=str(GCP / "quote_v4_padded8000.dat"))
    with mounted_tsm(options, workdir=tmp_path) as mount:
        yield mount


@pytest.fixture
def snp_tsm(tmp_path: Path) -> Iterator[MountedTsm]:
    with mounted_tsm(TsmFsOptions(provider="sev_guest"), workdir=tmp_path) as mount:
        yield mount


def attest_and_fetch(daemon: HwDaemon, tee: str) -> None:
    assert cli("tee", "--socket", daemon.socket).stdout == f"{tee}\n".encode()
    resource = cli("resource", "kbs:///default/key/1", "--socket", daemon.socket)
    assert resource.returncode == 0, resource.stderr
    assert resource.stdout == SECRET


def test_tdx_configfs(tmp_path: Path, tdx_tsm: MountedTsm, dev_kbs: DevKbsServer) -> None:
    flags = path_flags(tmp_path, tsm_root=tdx_tsm.root, ccel_data=GCP / "ccel_data.bin")
    daemon = HwDaemon(tmp_path, "--tee", "auto", "--kbs-url", dev_kbs.url, *flags)
    try:
        daemon.wait_ready()
        attest_and_fetch(daemon, "tdx")
        assert dev_kbs.core.counters["attest"] == 1
        evidence = json.loads(cli("evidence", "--socket", daemon.socket, "--runtime-data", "aGVsbG8=").stdout)
        assert list(evidence) == ["cc_eventlog", "quote"]
        decoded = json.loads(
            cli("evidence", "--decode", "--json", "--socket", daemon.socket, "--runtime-data", "aGVsbG8=").stdout
        )
        assert decoded["kind"] == "tdx_evidence"
        assert decoded["report_data"] == (b"hello" + bytes(59)).hex()
        assert decoded["event_log"]["rtmrs_match_quote"] == {f"rtmr{i}": True for i in range(4)}
        text = cli("evidence", "--decode", "--socket", daemon.socket).stdout.decode()
        assert "measurements:\n  mr_td: " in text
    finally:
        assert daemon.stop() == 0
    assert tdx_tsm.entries() == []  # every configfs entry was removed
    events = [json.loads(line) for line in daemon.log.splitlines() if line.startswith("{")]
    assert any(e["event"] == "tee.detected" and e["tee"] == "tdx" for e in events)


def test_snp_configfs(tmp_path: Path, snp_tsm: MountedTsm, dev_kbs: DevKbsServer) -> None:
    flags = path_flags(tmp_path, tsm_root=snp_tsm.root, sev_platform=True)
    daemon = HwDaemon(tmp_path, "--kbs-url", dev_kbs.url, *flags)  # tee defaults to auto
    try:
        daemon.wait_ready()
        attest_and_fetch(daemon, "snp")
        evidence = json.loads(cli("evidence", "--socket", daemon.socket, "--runtime-data", "AQID").stdout)
        report = snp.report_from_sev_json(evidence["attestation_report"])
        assert (report.report_data, report.vmpl) == (b"\x01\x02\x03" + bytes(61), 0)
        assert evidence["cert_chain"] == snp.parse_cert_table(DEFAULT_CERT_TABLE.read_bytes()).to_sev_json()
    finally:
        assert daemon.stop() == 0
    assert snp_tsm.state()["stats"]["reports"] >= 2


@pytest.mark.parametrize("certs_max", [None, 4096])
def test_snp_ioctl_fallback_under_shim(
    tmp_path: Path, guestdev_shim: GuestDevShim, dev_kbs: DevKbsServer, certs_max: int | None
) -> None:
    """No configfs: SNP_GET_EXT_REPORT; with a driver limit below our buffer (EINVAL), SNP_GET_REPORT."""
    sev = tmp_path / "dev" / "sev-guest"  # never created: the shim answers for it
    shim_log = tmp_path / "shim.log"
    settings: dict[str, object] = {"SNP_CERTS": DEFAULT_CERT_TABLE}
    if certs_max is not None:
        settings["CERTS_MAX"] = certs_max
    env = guestdev_shim.environ(sev_path=sev, log_path=shim_log, settings=settings)
    flags = path_flags(tmp_path, sev_guest_device=sev, sev_platform=True)
    daemon = HwDaemon(tmp_path, "--tee", "auto", "--kbs-url", dev_kbs.url, *flags, env=env)
    try:
        daemon.wait_ready()
        attest_and_fetch(daemon, "snp")
        evidence = json.loads(cli("evidence", "--socket", daemon.socket).stdout)
    finally:
        assert daemon.stop() == 0
    log = guestdev_shim.read_log(shim_log)
    assert log.opens == log.closes >= 2
    if certs_max is None:
        assert [c["cert_type"] for c in evidence["cert_chain"]] == ["VCEK", "ASK", "ARK"]
    else:
        assert evidence["cert_chain"] is None
        assert "snp.ext_report.fallback" in daemon.log


def test_snp_ioctl_firmware_error_reaches_the_caller(
    tmp_path: Path, guestdev_shim: GuestDevShim, dev_kbs: DevKbsServer
) -> None:
    sev = tmp_path / "dev" / "sev-guest"
    env = guestdev_shim.environ(sev_path=sev, settings={"VMPL_FLOOR": 1})
    flags = path_flags(tmp_path, sev_guest_device=sev, sev_platform=True)
    daemon = HwDaemon(tmp_path, "--tee", "snp", "--kbs-url", dev_kbs.url, *flags, env=env)
    try:
        daemon.wait_ready()
        result = cli("evidence", "--socket", daemon.socket)
    finally:
        daemon.stop()
    assert result.returncode == 1
    message = result.stderr.decode()
    assert "INTERNAL" in message
    assert "0x16 INVALID_PARAM" in message
    assert "Check:" in message
    assert message.count("\n") == 1


def test_bind_init_data_over_grpc(tmp_path: Path, tdx_tsm: MountedTsm, dev_kbs: DevKbsServer) -> None:
    """BindInitData on TDX compares with MRCONFIGID from the (here emulated) 6.16 sysfs registers."""
    from agent.api._gen import attestation_agent_pb2 as aa
    from agent.client import CallFailed, call

    digest = bytes(range(32))
    folder = tmp_path / "measurements"
    folder.mkdir()
    (folder / "mrconfigid").write_bytes(digest + bytes(16))
    (folder / "mrtd:sha384").write_bytes(bytes(48))
    for i in range(4):
        (folder / f"rtmr{i}:sha384").write_bytes(bytes(48))
    flags = [*path_flags(tmp_path, tsm_root=tdx_tsm.root), "--tdx-measurements-dir", str(folder)]
    daemon = HwDaemon(tmp_path, "--kbs-url", dev_kbs.url, *flags)
    path = "/attestation_agent.AttestationAgentService/BindInitData"
    try:
        daemon.wait_ready()
        call(daemon.socket, path, aa.BindInitDataRequest(Digest=digest), aa.BindInitDataResponse)
        with pytest.raises(CallFailed) as info:
            call(daemon.socket, path, aa.BindInitDataRequest(Digest=b"\x01" * 48), aa.BindInitDataResponse)
    finally:
        assert daemon.stop() == 0
    assert info.value.code == "FAILED_PRECONDITION"
    assert f"MRCONFIGID is {(digest + bytes(16)).hex()}, expected {('01' * 48)}" in str(info.value)
