"""SNP report, certificate table and evidence JSON against the real vectors; strictness and property tests."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import EvidenceParseError
from agent.tee import snp
from agent.tee.snp import CertTable, CertType, TcbLayout
from tests.unit.tee.vectorutil import flip, put, read

REPORTS = [
    ("hw/snp/report_v2_milan_gosevguest.bin", "snp/report_v2_milan_gosevguest.bin"),
    ("hw/snp/report_v2_milan_idblock_trustee.bin", "snp/report_v2_milan_idblock_trustee.bin"),
    ("hw/snp/report_v2_milan_virtee.bin", "snp/report_v2_milan_virtee.bin"),
    ("hw/snp/report_v3_milan_vlek_vmpl1_trustee.bin", "snp/report_v3_milan_vlek_vmpl1_trustee.bin"),
    ("hw/snp/report_v5_milan_gcp.bin", "snp/report_v5_milan_gcp.bin"),
    ("hw/snp/report_v5_milan_gcp_vmpl1.bin", "snp/report_v5_milan_gcp_vmpl1.bin"),
    ("hw/snp/report_v5_milan_gcp_x25519.bin", "snp/report_v5_milan_gcp_x25519.bin"),
    ("trustee/snp/test-report.bin", "snp/report_v2_milan_idblock_trustee.bin"),
    ("trustee/snp/test-vlek-report.bin", "snp/report_v3_milan_vlek_vmpl1_trustee.bin"),
]
SIGNERS = [
    ("hw/snp/report_v2_milan_gosevguest.bin", "hw/snp/vcek_milan_gosevguest.der"),
    ("hw/snp/report_v2_milan_idblock_trustee.bin", "hw/snp/vcek_milan_trustee.der"),
    ("hw/snp/report_v2_milan_virtee.bin", "hw/snp/vcek_milan_virtee.der"),
    ("hw/snp/report_v3_milan_vlek_vmpl1_trustee.bin", "hw/snp/vlek_milan_trustee.der"),
    ("hw/snp/report_v5_milan_gcp.bin", "hw/snp/vcek_milan_gcp.pem"),
    ("hw/snp/report_v5_milan_gcp_x25519.bin", "hw/snp/vcek_milan_gcp.pem"),
]
V2 = "hw/snp/report_v2_milan_gosevguest.bin"
V3 = "hw/snp/report_v3_milan_vlek_vmpl1_trustee.bin"
V5 = "hw/snp/report_v5_milan_gcp.bin"
TABLE = "hw/snp/cert_table_SYNTH_milan_gosevguest.bin"
E2E = "trustee/snp/snp-evidence-e2e.json"


def load_cert(raw: bytes) -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD VCEK/VLEK serial numbers are 0; cryptography warns about that
        if raw.startswith(b"-----"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)


class TestReportVectors:
    @pytest.mark.parametrize(("rel", "key"), REPORTS, ids=[r[0] for r in REPORTS])
    def test_parses_round_trips_and_matches_expected(
        self, vectors: Path, expected: dict[str, Any], rel: str, key: str
    ) -> None:
        data = read(vectors, rel)
        want = expected[key]
        assert hashlib.sha256(data).hexdigest() == want["sha256"]
        report = snp.parse_report(data)
        assert report.to_bytes() == data
        assert report.version == want["version"]
        assert report.guest_svn == want["guest_svn"]
        assert f"0x{report.policy:x}" == want["policy"]
        assert report.vmpl == want["vmpl"]
        assert report.sig_algo == want["sig_algo"]
        assert f"0x{report.platform_info:x}" == want["platform_info"]
        assert f"0x{report.signer_info:x}" == want["signer_info"]
        for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
            assert getattr(report, name).to_bytes(8, "little").hex() == want[name]
        for name in ("report_data", "measurement", "host_data", "id_key_digest", "report_id", "chip_id"):
            assert getattr(report, name).hex() == want[name]
        assert bytes(report.cpuid or (0, 0, 0)).hex() == want["cpuid_fms"]
        assert report.current_version.to_bytes().hex() == want["current_build.minor.major"]
        assert report.committed_version.to_bytes().hex() == want["committed"]
        assert f"0x{report.launch_mit_vector or 0:x}" == want["launch_mit_vector"]
        assert f"0x{report.current_mit_vector or 0:x}" == want["current_mit_vector"]
        assert (report.cpuid is None) == (report.version < 3)
        assert (report.launch_mit_vector is None) == (report.version < 5)
        assert report.tcb_layout is TcbLayout.PRE_TURIN
        json.dumps(report.to_dict())

    @pytest.mark.parametrize(("rel", "cert"), SIGNERS, ids=[s[0] for s in SIGNERS])
    def test_signature_covers_signed_bytes(self, vectors: Path, rel: str, cert: str) -> None:
        report = snp.parse_report(read(vectors, rel))
        key = load_cert(read(vectors, cert)).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        r = int.from_bytes(report.signature_r, "little")
        s = int.from_bytes(report.signature_s, "little")
        key.verify(encode_dss_signature(r, s), report.signed_bytes(), ec.ECDSA(hashes.SHA384()))
        want = "VLEK" if "vlek" in cert else "VCEK"
        assert report.signing_key == want

    def test_x25519_binding(self, vectors: Path) -> None:
        fields = dict(
            line.split("=", 1) for line in (vectors / "hw/snp/report_v5_milan_gcp_x25519.txt").read_text().split()
        )
        report = snp.parse_report(read(vectors, "hw/snp/report_v5_milan_gcp_x25519.bin"))
        digest = hashlib.sha512(bytes.fromhex(fields["NONCE"]) + bytes.fromhex(fields["X25519_KEY"])).digest()
        assert report.report_data == digest

    def test_azure_hcl_embedded_report(self, vectors: Path, expected: dict[str, Any]) -> None:
        hcl = read(vectors, "hw/azure/az_snp_hcl_report.bin")
        report = snp.parse_report(hcl[32 : 32 + snp.SNP_REPORT_LEN])
        want = expected["azure/az_snp_hcl_report.bin"]
        assert report.version == want["hw_report_version"]
        assert report.report_data.hex() == want["hw_report_data"]
        key = load_cert(read(vectors, "hw/azure/az_snp_vcek_ask_ark.pem")).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        sig = encode_dss_signature(
            int.from_bytes(report.signature_r, "little"), int.from_bytes(report.signature_s, "little")
        )
        key.verify(sig, report.signed_bytes(), ec.ECDSA(hashes.SHA384()))

    def test_decoded_views(self, vectors: Path) -> None:
        report = snp.parse_report(read(vectors, V3))
        assert report.tcb(report.reported_tcb) == snp.TcbVersion(fmc=None, bootloader=4, tee=0, snp=24, microcode=0xD9)
        assert snp.decode_signer_info(report.signer_info) == {
            "author_key_en": False,
            "mask_chip_key": False,
            "signing_key": "VLEK",
        }
        policy = snp.decode_policy(report.policy)
        assert policy["smt"] is True
        assert policy["debug"] is False
        assert policy["reserved_bit17_set"] is True
        assert policy["unknown_bits"] == "0x0"
        info = snp.decode_platform_info(report.platform_info)  # 0x27
        assert info["smt_en"]
        assert info["tsme_en"]
        assert info["ecc_en"]
        assert info["alias_check_complete"]
        assert not info["rapl_dis"]
        assert str(report.current_version) == "1.55.29"


class TestTcbLayout:
    def test_turin_family_uses_fmc_layout(self, vectors: Path) -> None:
        data = put(read(vectors, V3), 0x188, b"\x1a\x02\x00")
        raw_tcb = bytes((1, 2, 3, 4, 0, 0, 0, 5))
        for offset in (0x38, 0x180, 0x1E0, 0x1F0):
            data = put(data, offset, raw_tcb)
        report = snp.parse_report(data)
        assert report.tcb_layout is TcbLayout.TURIN
        tcb = report.tcb(report.reported_tcb)
        assert tcb == snp.TcbVersion(fmc=1, bootloader=2, tee=3, snp=4, microcode=5)
        assert tcb.encode() == int.from_bytes(raw_tcb, "little")
        assert report.to_sev_json()["reported_tcb"] == {"fmc": 1, "bootloader": 2, "tee": 3, "snp": 4, "microcode": 5}
        assert snp.report_from_sev_json(report.to_sev_json()) == report

    def test_v2_turin_guess_from_chip_id(self, vectors: Path) -> None:
        data = put(read(vectors, V2), 0x1A8, bytes(56))
        with pytest.raises(EvidenceParseError, match=re.escape("(turin TCB layout)")):
            snp.parse_report(data)  # the Milan TCB values do not fit the Turin layout
        for offset in (0x38, 0x180, 0x1E0, 0x1F0):
            data = put(data, offset, bytes((1, 2, 3, 4, 0, 0, 0, 5)))
        report = snp.parse_report(data)
        assert report.tcb_layout is TcbLayout.TURIN
        assert report.to_sev_json()["current_tcb"]["fmc"] == 1
        masked = put(read(vectors, V2), 0x1A0, bytes(64))
        assert snp.parse_report(masked).tcb_layout is TcbLayout.PRE_TURIN

    def test_layout_mismatch_in_json_rejected(self, vectors: Path) -> None:
        obj = snp.parse_report(read(vectors, V3)).to_sev_json()
        obj["launch_tcb"] = {**obj["launch_tcb"], "fmc": 1}
        message = "`launch_tcb` has layout turin, expected pre_turin for this report"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.report_from_sev_json(obj)


RESERVED_COMMON = [0x4C, 0x4F, 0x18B, 0x19F, 0x1EB, 0x1EF, 0x208, 0x29F, 0x330, 0x49F]


def _reserved_range(offset: int, version: int) -> tuple[str, int, int]:
    ranges = [
        ("SNP report reserved", 0x4C, 0x50),
        ("SNP report reserved", 0x188 if version < 3 else 0x18B, 0x1A0),
        ("SNP report reserved", 0x1EB, 0x1EC),
        ("SNP report reserved", 0x1EF, 0x1F0),
        ("SNP report reserved", 0x1F8 if version < 5 else 0x208, 0x2A0),
        ("SNP signature reserved", 0x330, 0x4A0),
    ]
    return next(r for r in ranges if r[1] <= offset < r[2])


class TestReportStrictness:
    @pytest.mark.parametrize(
        ("rel", "offset"),
        [(V2, o) for o in (*RESERVED_COMMON, 0x188, 0x18A, 0x1F8, 0x207)]
        + [(V3, o) for o in (*RESERVED_COMMON, 0x1F8, 0x207)]
        + [(V5, o) for o in RESERVED_COMMON],
    )
    def test_reserved_byte(self, vectors: Path, rel: str, offset: int) -> None:
        data = read(vectors, rel)
        what, start, end = _reserved_range(offset, data[0])
        message = f"{what} byte at 0x{offset:x} is 0x01, expected 0x00 (reserved range 0x{start:x}..0x{end:x})"
        with pytest.raises(EvidenceParseError, match=re.escape(message)) as info:
            snp.parse_report(flip(data, offset))
        assert info.value.offset == offset

    @pytest.mark.parametrize(
        ("offset", "value", "message"),
        [
            (0x0, b"\x01\x00\x00\x00", "SNP report `VERSION` is 1, expected 2, 3, 4 or 5"),
            (0x0, b"\x06\x00\x00\x00", "SNP report `VERSION` is 6, expected 2, 3, 4 or 5"),
            (0x34, b"\x02\x00\x00\x00", "`SIGNATURE_ALGO` is 2, expected 1 (ECDSA P-384 with SHA-384)"),
            (0x48, b"\x20\x00\x00\x00", "signer info reserved bits are 0x20, expected 0x0"),
            (0x48, b"\x08\x00\x00\x00", "`SIGNING_KEY` is 2, expected 0 (VCEK), 1 (VLEK) or 7 (none)"),
            (0x0A, b"\x01", "`POLICY` bit 17 is 0, expected 1 (reserved, must be one; policy 0x10000)"),
        ],
    )
    def test_words(self, vectors: Path, offset: int, value: bytes, message: str) -> None:
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.parse_report(put(read(vectors, V3), offset, value))

    @pytest.mark.parametrize(
        ("rel", "offset", "name", "layout"),
        [
            (V2, 0x3A, "CURRENT_TCB", "pre_turin"),
            (V3, 0x185, "REPORTED_TCB", "pre_turin"),
            (V5, 0x1F2, "LAUNCH_TCB", "pre_turin"),
        ],
    )
    def test_tcb_reserved_byte(self, vectors: Path, rel: str, offset: int, name: str, layout: str) -> None:
        message = f"`{name}` reserved byte at 0x{offset:x} is 0x01, expected 0x00 ({layout} TCB layout)"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.parse_report(flip(read(vectors, rel), offset))

    def test_turin_tcb_reserved_byte(self, vectors: Path) -> None:
        data = put(read(vectors, V3), 0x188, b"\x1a\x02\x00")  # Turin: byte 6 of a TCB is reserved
        message = "`CURRENT_TCB` reserved byte at 0x3e is 0x18, expected 0x00 (turin TCB layout)"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.parse_report(data)

    def test_version_4_is_laid_out_like_3(self, vectors: Path) -> None:
        data = put(read(vectors, V3), 0, b"\x04\x00\x00\x00")
        report = snp.parse_report(data)
        assert report.cpuid == (0x19, 1, 1)
        assert report.launch_mit_vector is None
        assert report.to_bytes() == data

    def test_signing_key_none(self, vectors: Path) -> None:
        report = snp.parse_report(put(read(vectors, V2), 0x48, b"\x1c\x00\x00\x00"))
        assert report.signing_key == "NONE"

    @pytest.mark.parametrize("size", [0, 4, 0x49F, 0x4A1, 0x4C0])
    def test_length(self, vectors: Path, size: int) -> None:
        data = (read(vectors, V2) + bytes(64))[:size]
        with pytest.raises(EvidenceParseError, match=re.escape(f"SNP report length is 0x{size:x}, expected 0x4a0")):
            snp.parse_report(data)

    def test_dataclass_invariants(self, vectors: Path) -> None:
        report = snp.parse_report(read(vectors, V5))
        fields = {name: getattr(report, name) for name in report.__dataclass_fields__}
        with pytest.raises(ValueError, match=re.escape("`cpuid` must be set exactly for report versions >= 3")):
            snp.AttestationReport(**{**fields, "cpuid": None})
        with pytest.raises(ValueError, match=re.escape("`launch_mit_vector` must be set exactly")):
            snp.AttestationReport(**{**fields, "version": 3})
        with pytest.raises(ValueError, match=re.escape("`report_data` length is 0x3f, expected 0x40")):
            snp.AttestationReport(**{**fields, "report_data": bytes(63)})


class TestEvidenceJson:
    def test_reproduces_trustee_e2e_vector(self, vectors: Path) -> None:
        text = (vectors / E2E).read_text()
        evidence = json.loads(text)
        # The vector holds only JSON: rebuild the report, serialise it to bytes, parse those, and re-emit the JSON.
        report = snp.report_from_sev_json(evidence["attestation_report"])
        raw = report.to_bytes()
        assert len(raw) == snp.SNP_REPORT_LEN
        reparsed = snp.parse_report(raw)
        assert reparsed == report
        chain = snp.cert_table_from_sev_json(evidence["cert_chain"])
        assert snp.parse_cert_table(chain.to_bytes()) == chain
        out = snp.snp_evidence(reparsed, chain)
        assert out == evidence
        assert list(out["attestation_report"]) == list(evidence["attestation_report"])
        assert json.dumps(out, separators=(",", ":")) == text.strip()

    def test_e2e_vcek_signs_rebuilt_report(self, vectors: Path) -> None:
        evidence = json.loads((vectors / E2E).read_text())
        report = snp.parse_report(snp.report_from_sev_json(evidence["attestation_report"]).to_bytes())
        vcek = snp.cert_table_from_sev_json(evidence["cert_chain"]).get(CertType.VCEK)
        assert vcek is not None
        key = load_cert(vcek).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        sig = encode_dss_signature(
            int.from_bytes(report.signature_r, "little"), int.from_bytes(report.signature_s, "little")
        )
        key.verify(sig, report.signed_bytes(), ec.ECDSA(hashes.SHA384()))

    @pytest.mark.parametrize("rel", [r[0] for r in REPORTS])
    def test_json_round_trip(self, vectors: Path, rel: str) -> None:
        report = snp.parse_report(read(vectors, rel))
        obj = json.loads(json.dumps(report.to_sev_json()))
        assert snp.report_from_sev_json(obj) == report
        keys = list(obj)
        assert keys[:7] == ["version", "guest_svn", "policy", "family_id", "image_id", "vmpl", "sig_algo"]
        assert keys[-1] == "signature"
        assert ("launch_mit_vector" in obj) == (report.version >= 5)
        if report.version < 3:
            assert obj["cpuid_fam_id"] is None

    def test_null_cert_chain(self, vectors: Path) -> None:
        report = snp.parse_report(read(vectors, V3))
        assert snp.snp_evidence(report, None)["cert_chain"] is None
        empty = snp.parse_cert_table(bytes(4096))
        assert snp.snp_evidence(report, empty)["cert_chain"] == []

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"version": 1}, "`version` is 1, expected 2, 3, 4 or 5"),
            ({"vmpl": -1}, "`vmpl` is -1, expected an integer 0..0xffffffff"),
            ({"vmpl": True}, "`vmpl` is True, expected an integer"),
            ({"report_data": [0] * 63}, "`report_data` is a list of 63 items, expected a list of 0x40 byte values"),
            ({"measurement": "00"}, "`measurement` is '00', expected a list of 0x30 byte values"),
            ({"cpuid_step": None}, "`cpuid_*` is null, expected integers for report version 3"),
            ({"launch_mit_vector": 1}, "`launch_mit_vector`/`current_mit_vector` is set, expected null for version 3"),
            ({"current": None}, "`current` is None, expected an object"),
            ({"signature": {"r": [0] * 72}}, "`s` is None, expected a list of 0x48 byte values"),
            ({"policy": 0}, "`POLICY` bit 17 is 0, expected 1"),
        ],
    )
    def test_bad_json(self, vectors: Path, change: dict[str, Any], message: str) -> None:
        obj = {**json.loads((vectors / E2E).read_text())["attestation_report"], **change}
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.report_from_sev_json(obj)

    @pytest.mark.parametrize(
        ("chain", "message"),
        [
            ("VCEK", "`cert_chain` is str, expected a list"),
            ([1], "`cert_chain[0]` is int, expected an object"),
            ([{"cert_type": "Empty", "data": [1]}], "`cert_chain[0].cert_type` is 'Empty', expected VCEK"),
            ([{"cert_type": {"OTHER": "nope"}, "data": [1]}], "`cert_chain[0].cert_type.OTHER` is 'nope'"),
            ([{"cert_type": "ARK", "data": []}], "`cert_chain[0].data` is list, expected a non-empty list"),
            ([{"cert_type": "ARK", "data": [256]}], "`data` is a list of 1 items, expected a list of 0x1 byte"),
        ],
    )
    def test_bad_cert_chain(self, chain: object, message: str) -> None:
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.cert_table_from_sev_json(chain)


GUID_OTHER = uuid.UUID("ecae0c0f-9502-43b1-afa2-0ae2e0d565b6")


class TestCertTable:
    def test_synthetic_vector(self, vectors: Path, expected: dict[str, Any]) -> None:
        data = read(vectors, TABLE)
        want = expected["snp/cert_table_SYNTH_milan_gosevguest.bin"]
        table = snp.parse_cert_table(data)
        assert table.to_bytes() == data
        assert table.size == want["size"]
        assert [
            {
                "guid": str(e.guid),
                "guid_raw_hex": e.guid.bytes.hex(),
                "length": len(e.data),
                "offset": e.offset,
                "sha256": hashlib.sha256(e.data).hexdigest(),
            }
            for e in table.entries
        ] == want["entries"]
        assert [e.cert_type for e in table.entries] == [CertType.VCEK, CertType.ASK, CertType.ARK]
        assert table.get(CertType.VCEK) == read(vectors, "hw/snp/vcek_milan_gosevguest.der")
        assert table.get(CertType.VLEK) is None
        assert CertTable.build([(e.cert_type, e.data) for e in table.entries]) == table
        assert [c["cert_type"] for c in table.to_sev_json()] == ["VCEK", "ASK", "ARK"]
        json.dumps(table.to_dict())

    def test_guid_names(self) -> None:
        assert CertType.of(uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")) is CertType.VLEK
        assert CertType.of(uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea")) is CertType.CRL
        assert CertType.of(GUID_OTHER) is CertType.OTHER
        table = CertTable.build([(CertType.CRL, b"crl"), (GUID_OTHER, b"\x01" * 8), (CertType.VLEK, b"v")])
        assert [c["cert_type"] for c in table.to_sev_json()] == ["CRL", {"OTHER": str(GUID_OTHER)}, "VLEK"]
        assert snp.cert_table_from_sev_json(table.to_sev_json()) == table

    def test_rfc_byte_order(self) -> None:
        raw = CertTable.build([(CertType.VCEK, b"x")]).to_bytes()
        assert raw[:16].hex() == "63da758de6644564adc5f4b93be8accd"

    def test_zero_padded_ioctl_buffer(self, vectors: Path) -> None:
        data = read(vectors, TABLE)
        padded = data + bytes(0x3000 - len(data))
        table = snp.parse_cert_table(padded)
        assert table.size == 0x3000
        assert table.to_bytes() == padded
        assert table.entries == snp.parse_cert_table(data).entries

    def test_empty_tables(self) -> None:
        assert snp.parse_cert_table(bytes(24)).entries == ()
        assert snp.parse_cert_table(bytes(4096)).to_bytes() == bytes(4096)

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda d: d[:23], "certificate table length is 0x17, expected at least 0x18 (no all-zero terminator"),
            (
                lambda d: put(d, 0x48 + 16, b"\x01"),
                "terminator entry at 0x48 offset/length is 0x1/0x0, expected 0x0/0x0",
            ),
            (
                lambda d: put(d, 20, b"\x00\x00\x00\x00"),
                "certificate `length` of 63da758d-e664-4564-adc5-f4b93be8accd is 0x0",
            ),
            (lambda d: put(d, 16, struct.pack("<I", 0x50)), "certificate `offset` is 0x50, expected at least 0x60"),
            (
                lambda d: put(d, 20, struct.pack("<I", 0x2000)),
                "certificate 63da758d-e664-4564-adc5-f4b93be8accd ends at 0x2060",
            ),
            (lambda d: put(d, 40, struct.pack("<I", 0x100)), "certificate `offset` 0x100 overlaps bytes before 0x5b0"),
            (
                lambda d: d + b"\x00\x07",
                "certificate table byte at 0x12a5 is 0x07, expected 0x00 (outside any certificate)",
            ),
            (
                lambda d: d[:4771],
                "certificate c0b406a4-a803-4952-9743-3fb6014cd0ae ends at 0x12a4, expected at most 0x12a3",
            ),
        ],
    )
    def test_strictness(self, vectors: Path, mutate: Any, message: str) -> None:
        data = read(vectors, TABLE)
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            snp.parse_cert_table(mutate(data))

    def test_gap_between_certificates_must_be_zero(self, vectors: Path) -> None:
        table = snp.parse_cert_table(read(vectors, TABLE))
        moved = CertTable(
            entries=(snp.CertTableEntry(guid=table.entries[0].guid, offset=0x80, data=table.entries[0].data),),
            size=0x80 + len(table.entries[0].data),
        )
        raw = moved.to_bytes()
        assert snp.parse_cert_table(raw) == moved
        with pytest.raises(EvidenceParseError, match=re.escape("byte at 0x30 is 0xaa, expected 0x00")):
            snp.parse_cert_table(put(raw, 0x30, b"\xaa"))


PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _report_or_error(data: bytes) -> None:
    try:
        report = snp.parse_report(data)
    except EvidenceParseError:
        return
    assert report.to_bytes() == data
    assert snp.report_from_sev_json(json.loads(json.dumps(report.to_sev_json()))) == report


class TestProperties:
    @PROP
    @given(data=st.binary(min_size=0x4A0, max_size=0x4A0))
    def test_random_reports(self, data: bytes) -> None:
        _report_or_error(data)

    @PROP
    @given(data=st.binary(min_size=0x4A0, max_size=0x4A0), version=st.sampled_from([2, 3, 4, 5]))
    def test_random_reports_with_plausible_words(self, data: bytes, version: int) -> None:
        raw = bytearray(data)
        raw[0:4] = struct.pack("<I", version)
        raw[0x34:0x38] = struct.pack("<I", 1)
        raw[0x48:0x50] = bytes(8)
        raw[0x0A] |= 0x02
        raw[0x188 if version < 3 else 0x18B : 0x1A0] = bytes(0x1A0 - (0x188 if version < 3 else 0x18B))
        raw[0x1EB] = raw[0x1EF] = 0
        raw[0x1F8 if version < 5 else 0x208 : 0x2A0] = bytes(0x2A0 - (0x1F8 if version < 5 else 0x208))
        raw[0x330:] = bytes(0x4A0 - 0x330)
        turin = raw[0x188] >= 0x1A if version >= 3 else any(raw[0x1A0:0x1A8]) and not any(raw[0x1A8:0x1E0])
        for offset in (0x38, 0x180, 0x1E0, 0x1F0):
            start, end = (offset + 4, offset + 7) if turin else (offset + 2, offset + 6)
            raw[start:end] = bytes(end - start)
        report = snp.parse_report(bytes(raw))
        assert report.to_bytes() == bytes(raw)
        assert snp.report_from_sev_json(json.loads(json.dumps(report.to_sev_json()))) == report

    @PROP
    @given(st.data())
    def test_mutated_real_reports(self, vectors: Path, data: st.DataObject) -> None:
        raw = bytearray(read(vectors, data.draw(st.sampled_from([V2, V3, V5]))))
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        _report_or_error(
            bytes(raw[: data.draw(st.sampled_from([len(raw), len(raw), data.draw(st.integers(0, len(raw)))]))])
        )

    @PROP
    @given(data=st.binary(max_size=400))
    def test_random_cert_tables(self, data: bytes) -> None:
        try:
            table = snp.parse_cert_table(data)
        except EvidenceParseError:
            return
        assert table.to_bytes() == data

    @PROP
    @given(st.data())
    def test_mutated_cert_table(self, vectors: Path, data: st.DataObject) -> None:
        raw = bytearray(read(vectors, TABLE))
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, 0x60))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(raw)))
        try:
            table = snp.parse_cert_table(bytes(raw[:cut]))
        except EvidenceParseError:
            return
        assert table.to_bytes() == bytes(raw[:cut])

    @PROP
    @given(
        certs=st.lists(
            st.tuples(
                st.sampled_from([*[t for t in CertType if t is not CertType.OTHER], GUID_OTHER]),
                st.binary(min_size=1, max_size=50),
            ),
            max_size=5,
        )
    )
    def test_build_parse_round_trip(self, certs: list[tuple[uuid.UUID | CertType, bytes]]) -> None:
        table = CertTable.build(certs)
        assert snp.parse_cert_table(table.to_bytes()) == table
        assert snp.cert_table_from_sev_json(json.loads(json.dumps(table.to_sev_json()))) == table
