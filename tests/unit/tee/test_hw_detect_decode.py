"""TEE detection (order and reasons), the attester choice, and the evidence decoder on the real vectors."""

from __future__ import annotations

import base64
import errno
import json
from dataclasses import replace
from pathlib import Path

import pytest

from agent import config
from agent.errors import EvidenceParseError, TeeUnavailable
from agent.tee import ccel, snp, tdx
from agent.tee.decode import decode, decode_evidence, format_text
from agent.tee.detect import detect
from agent.tee.sample import SampleAttester
from agent.tee.select import make_attester
from agent.tee.snp_attester import SnpAttester
from agent.tee.tdx_attester import TdxAttester
from tests.fakes.tsmfs import InMemoryTsm, TsmFsOptions
from tests.paths import VECTORS_DIR as VECTORS

HW = VECTORS / "hw"


def paths(tmp_path: Path, fs: InMemoryTsm | None = None) -> config.TeePaths:
    return config.TeePaths(
        tsm_report_dir=str(fs.root if fs else tmp_path / "config" / "tsm" / "report"),
        tdx_guest_device=str(tmp_path / "tdx_guest"),
        sev_guest_device=str(tmp_path / "sev-guest"),
        sev_guest_platform_dir=str(tmp_path / "platform-sev-guest"),
        tdx_measurements_dir=str(tmp_path / "measurements"),
        ccel_data=str(tmp_path / "CCEL"),
    )


class TestDetect:
    def test_nothing(self, tmp_path: Path) -> None:
        result = detect(paths(tmp_path))
        assert result.tee is None
        assert [(c.tee, c.interface, c.found) for c in result.checks] == [
            ("tdx", "configfs-tsm", False),
            ("tdx", "device", False),
            ("snp", "platform device", False),
            ("snp", "configfs-tsm", False),
            ("snp", "device", False),
        ]
        assert all("does not exist" in c.reason or "configfs-tsm" in c.reason for c in result.checks)
        assert str(tmp_path / "tdx_guest") in result.summary()

    def test_tdx_by_configfs_provider(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        result = detect(paths(tmp_path, fs), fsops=fs)
        assert result.tee == "tdx"
        assert result.checks[0].found
        assert result.checks[0].reason == "provider `tdx_guest`"
        assert result.checks[3].reason == "provider is `tdx_guest`, not `sev_guest`"
        assert fs.entries() == []  # the probe entry was removed

    def test_tdx_by_device_alone(self, tmp_path: Path) -> None:
        (tmp_path / "tdx_guest").write_bytes(b"")
        result = detect(paths(tmp_path))
        assert result.tee == "tdx"
        assert result.checks[1].line().startswith("found  tdx device ")

    def test_snp_by_platform_dir(self, tmp_path: Path) -> None:
        (tmp_path / "platform-sev-guest").mkdir()
        result = detect(paths(tmp_path))
        assert result.tee == "snp"
        assert result.checks[2].reason == "exists (directory)"

    def test_snp_by_configfs_provider(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        assert detect(paths(tmp_path, fs), fsops=fs).tee == "snp"

    def test_tdx_wins_over_snp(self, tmp_path: Path) -> None:
        (tmp_path / "platform-sev-guest").mkdir()
        (tmp_path / "sev-guest").write_bytes(b"")
        (tmp_path / "tdx_guest").write_bytes(b"")
        result = detect(paths(tmp_path))
        assert result.tee == "tdx"
        assert sum(c.found for c in result.checks) == 3  # every interface is still reported

    def test_configfs_without_provider(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider=""))
        result = detect(paths(tmp_path, fs), fsops=fs)
        assert result.tee is None
        assert "no provider registered" in result.checks[0].reason

    def test_configfs_permission_denied_is_a_reason(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest", mkdir_errno=errno.EACCES))
        result = detect(paths(tmp_path, fs), fsops=fs)
        assert result.tee is None
        assert "permission denied" in result.checks[0].reason
        assert "run as root" in result.checks[0].reason


class TestSelect:
    def cfg(self, tmp_path: Path, tee: str, fs: InMemoryTsm | None = None) -> config.Config:
        return replace(config.Config(), tee=tee, tee_paths=paths(tmp_path, fs))

    def test_auto_never_falls_back_to_sample(self, tmp_path: Path) -> None:
        with pytest.raises(TeeUnavailable) as info:
            make_attester(self.cfg(tmp_path, "auto"))
        message = str(info.value)
        assert "no supported TEE was found" in message
        assert "--tee sample" in message
        assert "cvm-agent tee --probe" in message
        assert "\n" not in message

    def test_auto_picks_the_detected_tee(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        assert isinstance(make_attester(self.cfg(tmp_path, "auto", fs), fsops=fs), TdxAttester)
        fs = InMemoryTsm(TsmFsOptions(provider="sev_guest"))
        attester = make_attester(self.cfg(tmp_path, "auto", fs), fsops=fs)
        assert isinstance(attester, SnpAttester)
        assert attester.tee == "snp"

    def test_by_name_without_probing(self, tmp_path: Path) -> None:
        fs = InMemoryTsm(TsmFsOptions(provider="tdx_guest"))
        assert make_attester(self.cfg(tmp_path, "tdx", fs), fsops=fs).tee == "tdx"
        cfg = replace(self.cfg(tmp_path, "snp", fs), snp=config.SnpConfig(vmpl=1))
        attester = make_attester(cfg, fsops=fs)
        assert isinstance(attester, SnpAttester)
        assert attester.vmpl == 1
        assert fs.calls == []
        assert isinstance(make_attester(self.cfg(tmp_path, "sample")), SampleAttester)


class TestDecode:
    def test_tdx_quote_v4_with_trailing_text(self) -> None:
        raw = (HW / "tdx" / "quote_v4_spr_e4_with_trailing_text.dat").read_bytes()
        decoded = decode(raw)
        quote = tdx.parse_quote(raw, trailing=tdx.Trailing.ANY)
        assert (decoded["kind"], decoded["tee"], decoded["version"]) == ("tdx_quote", "tdx", 4)
        assert decoded["trailing_len"] == 39
        assert decoded["measurements"]["mr_td"] == quote.body.mr_td.hex()
        assert decoded["measurements"]["rtmr2"] == quote.body.rtmrs[2].hex()
        assert decoded["report_data"] == quote.body.report_data.hex()
        assert "mr_seam" in decoded["tcb"]
        assert decoded["details"] == quote.to_dict()

    def test_tdx_quote_v5_has_servicetd(self) -> None:
        decoded = decode((HW / "tdx" / "quote_v5_tdx15_trustee.dat").read_bytes())
        assert decoded["version"] == 5
        assert any(decoded["measurements"]["mr_servicetd"].strip("0"))
        assert "tee_tcb_svn2" in decoded["tcb"]

    def test_td_report(self) -> None:
        raw = (HW / "tdx" / "tdreport_v1_tdx15_guestcomponents.bin").read_bytes()
        decoded = decode(raw)
        assert decoded["kind"] == "tdx_td_report"
        assert decoded["measurements"]["mr_config_id"] == tdx.parse_td_report(raw).td_info.mr_config_id.hex()
        assert decoded["hashes_ok"] == {"tee_tcb_info_hash": True, "tee_info_hash": True}

    def test_snp_report(self) -> None:
        raw = (HW / "snp" / "report_v5_milan_gcp.bin").read_bytes()
        report = snp.parse_report(raw)
        decoded = decode(raw)
        assert (decoded["kind"], decoded["version"], decoded["vmpl"]) == ("snp_report", 5, 0)
        assert decoded["measurements"]["measurement"] == report.measurement.hex()
        assert decoded["measurements"]["host_data"] == report.host_data.hex()
        assert decoded["tcb"]["reported_tcb"]["raw"] == f"{report.reported_tcb:016x}"
        assert decoded["policy"]["raw"] == f"0x{report.policy:x}"

    def test_trustee_snp_evidence(self) -> None:
        raw = (VECTORS / "trustee" / "snp" / "snp-evidence-e2e.json").read_bytes()
        decoded = decode(raw)
        assert decoded["kind"] == "snp_evidence"
        assert decoded["version"] == 3
        assert decoded["cert_chain"] == [{"cert_type": "VCEK", "length": decoded["cert_chain"][0]["length"]}]

    def test_tdx_evidence_replays_the_event_log(self) -> None:
        folder = HW / "tdx" / "ccel_gcp_cos113"
        quote = (folder / "quote_v4_padded8000.dat").read_bytes()
        eventlog = ccel.build_cc_eventlog((folder / "ccel_data.bin").read_bytes(), None)
        assert eventlog is not None
        evidence = {"cc_eventlog": base64.b64encode(eventlog).decode(), "quote": base64.b64encode(quote).decode()}
        decoded = decode(json.dumps(evidence).encode())
        assert decoded["kind"] == "tdx_evidence"
        assert decoded["event_log"]["events"] == 43
        assert decoded["event_log"]["rtmrs_match_quote"] == {f"rtmr{i}": True for i in range(4)}
        assert decode_evidence({"cc_eventlog": None, "quote": evidence["quote"]})["event_log"] is None

    def test_sample_evidence(self) -> None:
        decoded = decode(b'{"svn":"1","report_data":"aGVsbG8="}')
        assert (decoded["tee"], decoded["report_data"]) == ("sample", b"hello".hex())

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"\x00" * 100, "are not a TDX quote, a TD report"),
            (b"{not json", "starts like JSON but does not parse"),
            (b'{"a": 1}', "expected those of tdx, snp or sample evidence"),
            (b'{"quote": "!!"}', "not valid standard base64"),
        ],
    )
    def test_rejects(self, data: bytes, message: str) -> None:
        with pytest.raises(EvidenceParseError, match=message):
            decode(data)

    def test_text_form(self) -> None:
        text = format_text(decode((HW / "snp" / "report_v2_milan_gosevguest.bin").read_bytes()))
        assert text.startswith("kind: snp_report\ntee: snp\n")
        assert "\nmeasurements:\n  measurement: " in text
        assert "details" not in text
