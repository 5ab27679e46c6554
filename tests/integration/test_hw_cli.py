"""`cvm-agent tee --probe` and `cvm-agent evidence --decode` on emulated hardware and on the real vectors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import main
from agent.tee import snp, tdx
from tests.fakes.tsmfs import MountedTsm, TsmFsOptions, mounted_tsm
from tests.integration.hw_fixtures import cli, path_flags
from tests.paths import VECTORS_DIR as VECTORS

pytestmark = pytest.mark.integration

GCP = VECTORS / "hw" / "tdx" / "ccel_gcp_cos113"


@pytest.fixture
def tdx_tsm(tmp_path: Path) -> Iterator[MountedTsm]:
    with mounted_tsm(TsmFsOptions(provider="tdx_guest"), workdir=tmp_path) as mount:
        yield mount


@pytest.fixture
def snp_tsm(tmp_path: Path) -> Iterator[MountedTsm]:
    with mounted_tsm(TsmFsOptions(provider="sev_guest"), workdir=tmp_path) as mount:
        yield mount


def test_probe_on_emulated_hardware(tmp_path: Path, tdx_tsm: MountedTsm) -> None:
    result = cli("tee", "--probe", *path_flags(tmp_path, tsm_root=tdx_tsm.root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "tee: tdx"
    assert lines[1].startswith(f"  found  tdx configfs-tsm {tdx_tsm.root}: provider `tdx_guest`")
    assert len(lines) == 6
    assert all("absent" in line for line in lines[2:])


def test_probe_nothing_found(tmp_path: Path) -> None:
    result = cli("tee", "--probe", *path_flags(tmp_path))
    assert result.returncode == 1
    out = result.stdout.decode()
    assert out.startswith("tee: none\n")
    assert "--tee sample" in out
    served = cli("serve", "--socket", str(tmp_path / "x.sock"), *path_flags(tmp_path))
    assert served.returncode == 1
    assert b"no supported TEE was found" in served.stderr
    assert b"--tee sample" in served.stderr


def test_decode_local_on_emulated_snp(tmp_path: Path, snp_tsm: MountedTsm) -> None:
    flags = path_flags(tmp_path, tsm_root=snp_tsm.root, sev_platform=True)
    result = cli("evidence", "--decode", "--local", "--json", "--runtime-data", "AQID", *flags)
    assert result.returncode == 0, result.stderr
    decoded = json.loads(result.stdout)
    assert (decoded["kind"], decoded["vmpl"]) == ("snp_evidence", 0)
    assert decoded["report_data"].startswith("010203")


@pytest.mark.parametrize(
    ("vector", "kind"),
    [
        ("hw/tdx/quote_v4_trustee_padded.dat", "tdx_quote"),
        ("hw/tdx/quote_v5_tdx15_gotdxguest.dat", "tdx_quote"),
        ("hw/tdx/tdreport_v0_tdx10_dcap.bin", "tdx_td_report"),
        ("hw/snp/report_v3_milan_vlek_vmpl1_trustee.bin", "snp_report"),
        ("trustee/snp/snp-evidence-e2e.json", "snp_evidence"),
    ],
)
def test_decode_vectors(vector: str, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process (`cvm-agent` main) to keep this fast; the subprocess form is covered by the tests above
    assert main(["evidence", "--decode", str(VECTORS / vector), "--json"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    assert decoded["kind"] == kind
    raw = (VECTORS / vector).read_bytes()
    if kind == "tdx_quote":
        assert decoded["measurements"]["mr_config_id"] == tdx.parse_quote(raw).body.mr_config_id.hex()
    if kind == "snp_report":
        assert decoded["vmpl"] == snp.parse_report(raw).vmpl == 1
    assert main(["evidence", "--decode", str(VECTORS / vector)]) == 0
    assert capsys.readouterr().out.startswith(f"kind: {kind}\n")


def test_decode_stdin_and_errors(tmp_path: Path) -> None:
    raw = (GCP / "quote_v4_padded8000.dat").read_bytes()
    result = cli("evidence", "--decode", "-", stdin=raw)
    assert result.returncode == 0
    assert b"kind: tdx_quote" in result.stdout
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 10)
    bad = cli("evidence", "--decode", str(junk))
    assert bad.returncode == 1
    assert b"are not a TDX quote" in bad.stderr
    usage = cli("evidence", "--decode", str(junk), "--local")
    assert usage.returncode == 2
    usage = cli("evidence", "--ccel-data", "/x")
    assert usage.returncode == 2
    assert b"--ccel-data applies only with --decode --local" in usage.stderr


def test_probe_states_the_plain_http_risk(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[kbs]\nurl = "http://10.0.0.2:8080"\n')
    out = cli("tee", "--probe", "--config", str(config), *path_flags(tmp_path)).stdout.decode()
    assert "kbs: http://10.0.0.2:8080\n  warning: plain HTTP to the KBS: anyone on the path, the host included" in out
    assert "JWE protects only against passive readers of the response" in out
    config.write_text('[kbs]\nurl = "https://kbs.example"\n')
    assert "warning" not in cli("tee", "--probe", "--config", str(config), *path_flags(tmp_path)).stdout.decode()
