"""TD report and TD quote parsing against the real vectors, strictness tables and property tests."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import EvidenceParseError
from agent.tee import tdx
from agent.tee.tdx import CertificationDataType, QeReportCertificationData, Trailing
from tests.unit.tee.vectorutil import flip, put, read

# (path under vectors/, key in hw/expected.json, trailing policy the file needs)
QUOTES = [
    ("hw/tdx/quote_v4_spr_e4_with_trailing_text.dat", "tdx/quote_v4_spr_e4_with_trailing_text.dat", Trailing.ANY),
    ("hw/tdx/quote_v4_trustee.dat", "tdx/quote_v4_trustee.dat", Trailing.REJECT),
    ("hw/tdx/quote_v4_trustee_padded.dat", "tdx/quote_v4_trustee_padded.dat", Trailing.ZEROS),
    ("hw/tdx/quote_v5_tdx15_gotdxguest.dat", "tdx/quote_v5_tdx15_gotdxguest.dat", Trailing.REJECT),
    ("hw/tdx/quote_v5_tdx15_trustee.dat", "tdx/quote_v5_tdx15_trustee.dat", Trailing.REJECT),
    ("hw/tdx/ccel_gcp_cos113/quote_v4_padded8000.dat", "tdx/ccel_gcp_cos113/quote_v4_padded8000.dat", Trailing.ZEROS),
    ("hw/azure/az_tdx_td_quote.bin", "azure/az_tdx_td_quote.bin", Trailing.ZEROS),
    # trustee copies: same bytes as the hw/ files (checked by SHA-256 below)
    ("trustee/tdx/tdx_quote_4.dat", "tdx/quote_v4_trustee.dat", Trailing.REJECT),
    ("trustee/tdx/tdx_quote_5.dat", "tdx/quote_v5_tdx15_trustee.dat", Trailing.REJECT),
    ("trustee/tdx/tdx_quote_6.dat", "tdx/quote_v4_trustee_padded.dat", Trailing.ZEROS),
    ("trustee/azure/az-tdx-vtpm-td-quote.bin", "azure/az_tdx_td_quote.bin", Trailing.ZEROS),
]
REPORTS = [
    ("hw/tdx/tdreport_v0_tdx10_dcap.bin", "tdx/tdreport_v0_tdx10_dcap.bin"),
    ("hw/tdx/tdreport_v1_tdx15_guestcomponents.bin", "tdx/tdreport_v1_tdx15_guestcomponents.bin"),
    ("trustee/tdx/tdx_report_1.bin", "tdx/tdreport_v1_tdx15_guestcomponents.bin"),
]
V4 = "hw/tdx/quote_v4_trustee.dat"
V5 = "hw/tdx/quote_v5_tdx15_trustee.dat"
REPORT_V1 = "hw/tdx/tdreport_v1_tdx15_guestcomponents.bin"
REPORT_V0 = "hw/tdx/tdreport_v0_tdx10_dcap.bin"


class TestQuoteVectors:
    @pytest.mark.parametrize(("rel", "key", "policy"), QUOTES, ids=[q[0] for q in QUOTES])
    def test_parses_round_trips_and_matches_expected(
        self, vectors: Path, expected: dict[str, Any], rel: str, key: str, policy: Trailing
    ) -> None:
        data = read(vectors, rel)
        want = expected[key]
        assert hashlib.sha256(data).hexdigest() == want["sha256"]
        quote = tdx.parse_quote(data, trailing=policy)
        assert quote.to_bytes() == data
        assert len(quote.quote_bytes()) == want["quote_len"]
        assert any(quote.trailing) == want["trailing_nonzero"]
        header, body = quote.header, quote.body
        assert header.version == want["version"]
        assert header.to_bytes()[8:12].hex() == want["hdr_8_12"]
        assert header.qe_vendor_id.hex() == want["qe_vendor_id"]
        assert header.user_data.hex() == want["user_data"]
        assert body.mr_td.hex() == want["mrtd"]
        assert body.mr_config_id.hex() == want["mrconfigid"]
        assert body.mr_owner.hex() == want["mrowner"]
        assert body.report_data.hex() == want["reportdata"]
        assert [r.hex() for r in body.rtmrs] == [want[f"rtmr{i}"] for i in range(4)]
        assert body.td_attributes.hex() == want["td_attributes"]
        assert body.xfam.hex() == want["xfam"]
        assert body.tee_tcb_svn.hex() == want["tee_tcb_svn"]
        assert len(body.to_bytes()) == want["body_size"]
        if "body_type" in want:
            assert quote.body_type == want["body_type"]
            assert body.tee_tcb_svn2 is not None
            assert body.mr_servicetd is not None
            assert body.tee_tcb_svn2.hex() == want["tee_tcb_svn2"]
            assert body.mr_servicetd.hex() == want["mrservicetd"]
        else:
            assert not body.is_tdx15
        sig = quote.signature_data
        assert len(sig.to_bytes()) == want["sig_data_len"]
        assert len(quote.signed_bytes()) == want["sig_data_len_offset"]
        cert = sig.certification
        assert isinstance(cert, QeReportCertificationData)
        assert cert.cert_type == want["cert_data_type"]
        assert len(cert.payload()) == want["cert_data_size"]
        inner = cert.certification_data
        assert inner.cert_type == want["inner_cert_type"]
        assert len(inner.data) == want["inner_cert_size"]
        assert len(inner.pem_certificates()) == want["pck_chain_certs"]
        json.dumps(quote.to_dict())

    @pytest.mark.parametrize(("rel", "key", "policy"), QUOTES[:7], ids=[q[0] for q in QUOTES[:7]])
    def test_attestation_key_signs_signed_bytes(self, vectors: Path, rel: str, key: str, policy: Trailing) -> None:
        quote = tdx.parse_quote(read(vectors, rel), trailing=policy)
        sig = quote.signature_data
        point = b"\x04" + sig.attestation_key
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        r, s = int.from_bytes(sig.signature[:32], "big"), int.from_bytes(sig.signature[32:], "big")
        public.verify(encode_dss_signature(r, s), quote.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        assert isinstance(sig.certification, QeReportCertificationData)
        bound = hashlib.sha256(sig.attestation_key + sig.certification.qe_auth_data).digest()
        assert sig.certification.qe_report_data[:32] == bound

    def test_trustee_claims_oracle(self, vectors: Path) -> None:
        claims = json.loads((vectors / "trustee/tdx/parse_tdx_claims_expected.json").read_text())["quote"]
        quote = tdx.parse_quote(read(vectors, "trustee/tdx/tdx_quote_4.dat"))
        raw_header = quote.header.to_bytes()
        assert raw_header[0:2].hex() == claims["header"]["version"]
        assert raw_header[2:4].hex() == claims["header"]["att_key_type"]
        assert raw_header[4:8].hex() == claims["header"]["tee_type"]
        assert raw_header[8:12].hex() == claims["header"]["reserved"]
        assert quote.header.qe_vendor_id.hex() == claims["header"]["vendor_id"]
        assert quote.header.user_data.hex() == claims["header"]["user_data"]
        body = quote.body
        fields = {
            "mr_config_id": body.mr_config_id,
            "mr_owner": body.mr_owner,
            "mr_owner_config": body.mr_owner_config,
            "mr_seam": body.mr_seam,
            "mr_td": body.mr_td,
            "mrsigner_seam": body.mrsigner_seam,
            "report_data": body.report_data,
            "seam_attributes": body.seam_attributes,
            "tcb_svn": body.tee_tcb_svn,
            "td_attributes": body.td_attributes,
            "xfam": body.xfam,
            **{f"rtmr_{i}": r for i, r in enumerate(body.rtmrs)},
        }
        assert {k: v.hex() for k, v in fields.items()} == claims["body"]
        decoded = tdx.decode_td_attributes(body.td_attributes)
        attrs = json.loads((vectors / "trustee/tdx/parse_tdx_claims_expected.json").read_text())["td_attributes"]
        assert decoded["debug"] is attrs["debug"]
        assert decoded["sept_ve_disable"] is attrs["septve_disable"]
        assert decoded["protection_keys"] is attrs["protection_keys"]
        assert decoded["key_locker"] is attrs["key_locker"]
        assert decoded["perfmon"] is attrs["perfmon"]

    def test_servtd_hash_matches_mr_servicetd(self, vectors: Path) -> None:
        quote = tdx.parse_quote(read(vectors, V5))
        report = tdx.parse_td_report(read(vectors, REPORT_V1))
        assert quote.body.mr_servicetd == report.td_info.servtd_hash

    def test_azure_quote_matches_hcl_td_report(self, vectors: Path, expected: dict[str, Any]) -> None:
        hcl = read(vectors, "hw/azure/az_tdx_hcl_report.bin")
        report = tdx.parse_td_report(hcl[32 : 32 + tdx.TDX_REPORT_LEN])
        assert not any(hcl[32 + tdx.TDX_REPORT_LEN : 32 + 1184])  # the TD report is zero-padded to 1184
        assert report.version == 0
        assert report.report_data.hex() == expected["azure/az_tdx_hcl_report.bin"]["hw_report_data"]
        quote = tdx.parse_quote(read(vectors, "hw/azure/az_tdx_td_quote.bin"))
        assert quote.body.report_data == report.report_data
        assert quote.body.mr_td == report.td_info.mr_td
        assert report.tee_tcb_info_hash_ok()
        assert report.tee_info_hash_ok()


class TestTrailing:
    def test_text_after_quote_rejected_by_default(self, vectors: Path) -> None:
        data = read(vectors, QUOTES[0][0])
        msg = "trailing byte at 0x1347 is 0x0a, expected 0x00 (quote ends at 0x1347)"
        with pytest.raises(EvidenceParseError, match=re.escape(msg)) as info:
            tdx.parse_quote(data)
        assert info.value.offset == 0x1347

    def test_any_keeps_text_verbatim(self, vectors: Path) -> None:
        data = read(vectors, QUOTES[0][0])
        quote = tdx.parse_quote(data, trailing=Trailing.ANY)
        assert quote.trailing == b"\nextra bytes(only for testing purpose)\n"
        assert quote.quote_bytes() == data[:4935]

    def test_zero_padding_accepted_by_default_and_rejected_on_request(self, vectors: Path) -> None:
        data = read(vectors, "hw/tdx/quote_v4_trustee_padded.dat")
        quote = tdx.parse_quote(data)
        assert quote.trailing == bytes(5006 - 4936)
        msg = "trailing data length is 0x46, expected 0x0 (quote ends at 0x1348)"
        with pytest.raises(EvidenceParseError, match=re.escape(msg)):
            tdx.parse_quote(data, trailing=Trailing.REJECT)

    def test_exact_quote_has_no_trailing(self, vectors: Path) -> None:
        quote = tdx.parse_quote(read(vectors, V4), trailing=Trailing.REJECT)
        assert quote.trailing == b""
        assert quote.to_bytes() == quote.quote_bytes()


class TestQuoteStrictness:
    @pytest.mark.parametrize(
        ("offset", "value", "message"),
        [
            (0, b"\x03\x00", "quote `version` is 3, expected 4 or 5"),
            (0, b"\x06\x00", "quote `version` is 6, expected 4 or 5"),
            (2, b"\x03\x00", "`att_key_type` is 3, expected 2 (ECDSA P-256)"),
            (4, b"\x00\x00\x00\x00", "`tee_type` is 0x0, expected 0x81 (TDX)"),
            (8, b"\x01", "quote header reserved byte at 0x8 is 0x01, expected 0x00 (reserved range 0x8..0xc)"),
            (11, b"\xff", "quote header reserved byte at 0xb is 0xff, expected 0x00 (reserved range 0x8..0xc)"),
            (0x278, b"\xff\xff\x00\x00", "`quote` length is 0x1348, expected at least 0x1027b"),
            (0x278, b"\x10\x00\x00\x00", "`signature_data_len` is 0x10, expected at least 0x86"),
            (0x2FC, b"\x08\x00", "`certification_data` type is 8, expected 1..7"),
            (0x2FE, b"\x00\x00\x00\x00", "`certification_data` size is 0x0, expected 0x1046"),
        ],
    )
    def test_v4_header_and_signature_fields(self, vectors: Path, offset: int, value: bytes, message: str) -> None:
        data = put(read(vectors, V4), offset, value)
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            tdx.parse_quote(data)

    @pytest.mark.parametrize(
        ("offset", "value", "message"),
        [
            (48, b"\x01\x00", "quote body `type` is 1 (SGX report), expected 2 or 3"),
            (48, b"\x04\x00", "quote body `type` is 4, expected 2 or 3"),
            (48, b"\x02\x00", "quote body `size` is 0x288, expected 0x248 for body type 2"),
            (50, b"\x48\x02\x00\x00", "quote body `size` is 0x248, expected 0x288 for body type 3"),
        ],
    )
    def test_v5_body_descriptor(self, vectors: Path, offset: int, value: bytes, message: str) -> None:
        data = put(read(vectors, V5), offset, value)
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            tdx.parse_quote(data)

    def test_v5_with_tdx10_body(self, vectors: Path) -> None:
        v4 = tdx.parse_quote(read(vectors, V4))
        header = tdx.QuoteHeader(version=5, qe_vendor_id=v4.header.qe_vendor_id, user_data=v4.header.user_data)
        quote = tdx.TdxQuote(header=header, body=v4.body, signature_data=v4.signature_data)
        raw = quote.to_bytes()
        assert raw[48:54] == struct.pack("<HI", 2, 584)
        assert tdx.parse_quote(raw) == quote

    def test_nested_qe_report_type_rejected(self, vectors: Path) -> None:
        data = read(vectors, V4)
        auth_len = struct.unpack_from("<H", data, 0x302 + 384 + 64)[0]
        nested = 0x302 + 384 + 64 + 2 + auth_len
        with pytest.raises(EvidenceParseError, match=re.escape("nested `certification_data` type is 6, expected")):
            tdx.parse_quote(put(data, nested, b"\x06\x00"))

    def test_non_qe_cert_type_is_opaque(self, vectors: Path) -> None:
        quote = tdx.parse_quote(read(vectors, V4))
        pck = tdx.CertificationData(cert_type=CertificationDataType.PCK_CERT_CHAIN, data=b"pem")
        sig = tdx.QuoteSignatureData(
            signature=quote.signature_data.signature,
            attestation_key=quote.signature_data.attestation_key,
            certification=pck,
        )
        rebuilt = tdx.TdxQuote(header=quote.header, body=quote.body, signature_data=sig)
        assert tdx.parse_quote(rebuilt.to_bytes()) == rebuilt

    def test_every_truncation_fails_cleanly(self, vectors: Path) -> None:
        data = read(vectors, V5)
        for cut in (*range(60), 0x2BD, 0x2BE, 0x2C1, 0x2C2, 0x300, 0x400, len(data) - 1):
            with pytest.raises(EvidenceParseError):
                tdx.parse_quote(data[:cut])

    def test_dataclass_checks(self, vectors: Path) -> None:
        quote = tdx.parse_quote(read(vectors, V5))
        with pytest.raises(ValueError, match=re.escape("a version-4 quote carries a TDX 1.0 body")):
            tdx.TdxQuote(
                header=tdx.QuoteHeader(version=4, qe_vendor_id=bytes(16), user_data=bytes(20)),
                body=quote.body,
                signature_data=quote.signature_data,
            )
        with pytest.raises(ValueError, match=re.escape("`user_data` length is 0x13, expected 0x14")):
            tdx.QuoteHeader(version=4, qe_vendor_id=bytes(16), user_data=bytes(19))
        with pytest.raises(ValueError, match=re.escape("`cert_type` is 6, expected 1..5 or 7")):
            tdx.CertificationData(cert_type=6, data=b"")


class TestTdReport:
    @pytest.mark.parametrize(("rel", "key"), REPORTS, ids=[r[0] for r in REPORTS])
    def test_parses_round_trips_and_matches_expected(
        self, vectors: Path, expected: dict[str, Any], rel: str, key: str
    ) -> None:
        data = read(vectors, rel)
        want = expected[key]
        assert hashlib.sha256(data).hexdigest() == want["sha256"]
        report = tdx.parse_td_report(data)
        assert report.to_bytes() == data
        assert data[:4].hex() == want["reporttype_bytes"]
        assert report.version == data[2]
        assert report.cpusvn.hex() == want["cpusvn"]
        assert report.mac.hex() == want["mac"]
        assert report.report_data.hex() == want["reportdata"]
        assert report.tee_info_hash.hex() == want["tee_info_hash"]
        assert report.tee_tcb_info_hash.hex() == want["tee_tcb_info_hash"]
        assert report.tee_info_hash_ok() is want["tee_info_hash_ok"]
        assert report.tee_tcb_info_hash_ok() is want["tee_tcb_info_hash_ok"]
        tcb, td = report.tee_tcb_info, report.td_info
        assert tcb.valid.hex() == want["tee_tcb_info.valid"]
        assert tcb.tee_tcb_svn.hex() == want["tee_tcb_svn"]
        assert tcb.mr_seam.hex() == want["mrseam"]
        assert td.attributes.hex() == want["attributes"]
        assert td.xfam.hex() == want["xfam"]
        assert td.mr_td.hex() == want["mrtd"]
        assert td.mr_config_id.hex() == want["mrconfigid"]
        assert td.mr_owner.hex() == want["mrowner"]
        assert td.mr_owner_config.hex() == want["mrownerconfig"]
        assert [r.hex() for r in td.rtmrs] == [want[f"rtmr{i}"] for i in range(4)]
        assert td.servtd_hash.hex() == want["servtd_hash"]
        json.dumps(report.to_dict())

    @pytest.mark.parametrize(
        ("offset", "message"),
        [
            (0, "`REPORTTYPE.type` is 0x80, expected 0x81"),
            (1, "`REPORTTYPE.subtype` is 0x1, expected 0x0"),
            (2, "`REPORTTYPE.version` is 0x0, expected 0x0 or 0x1"),  # placeholder, replaced below
            (3, "`REPORTTYPE` reserved byte at 0x3 is 0x01, expected 0x00 (reserved range 0x3..0x4)"),
            (4, "`REPORTMACSTRUCT` reserved byte at 0x4 is 0x01, expected 0x00 (reserved range 0x4..0x10)"),
            (15, "`REPORTMACSTRUCT` reserved byte at 0xf is 0x01, expected 0x00 (reserved range 0x4..0x10)"),
            (0xC0, "`REPORTMACSTRUCT` reserved byte at 0xc0 is 0x01, expected 0x00 (reserved range 0xc0..0xe0)"),
            (0xDF, "`REPORTMACSTRUCT` reserved byte at 0xdf is 0x01, expected 0x00 (reserved range 0xc0..0xe0)"),
            (0x190, "`TEE_TCB_INFO` reserved byte at 0x190 is 0x01, expected 0x00 (reserved range 0x190..0x1ef)"),
            (0x1EE, "`TEE_TCB_INFO` reserved byte at 0x1ee is 0x01, expected 0x00 (reserved range 0x190..0x1ef)"),
            (0x1EF, "`TDREPORT` reserved byte at 0x1ef is 0x01, expected 0x00 (reserved range 0x1ef..0x200)"),
            (0x1FF, "`TDREPORT` reserved byte at 0x1ff is 0x01, expected 0x00 (reserved range 0x1ef..0x200)"),
            (0x3C0, "`TDINFO` reserved byte at 0x3c0 is 0x01, expected 0x00 (reserved range 0x3c0..0x400)"),
            (0x3FF, "`TDINFO` reserved byte at 0x3ff is 0x01, expected 0x00 (reserved range 0x3c0..0x400)"),
        ],
    )
    def test_reserved_and_type_bytes(self, vectors: Path, offset: int, message: str) -> None:
        data = read(vectors, REPORT_V1)
        if offset == 2:
            data, message = put(data, 2, b"\x02"), "`REPORTTYPE.version` is 0x2, expected 0x0 or 0x1"
        else:
            data = flip(data, offset)
        with pytest.raises(EvidenceParseError, match=re.escape(message)) as info:
            tdx.parse_td_report(data)
        assert info.value.offset == offset

    def test_version0_requires_zero_servtd_hash(self, vectors: Path) -> None:
        data = flip(read(vectors, REPORT_V0), 0x390)
        message = "`SERVTD_HASH` (version 0) byte at 0x390 is 0x01, expected 0x00 (reserved range 0x390..0x3c0)"
        with pytest.raises(EvidenceParseError, match=re.escape(message)):
            tdx.parse_td_report(data)

    def test_version0_allows_tee_tcb_svn2(self, vectors: Path) -> None:
        # Real data: Azure's version-0 TD report carries a non-zero TEE_TCB_SVN2 (hw-abi.md labels it 1.5-only).
        report = tdx.parse_td_report(read(vectors, "hw/azure/az_tdx_hcl_report.bin")[32:1056])
        assert report.version == 0
        assert any(report.tee_tcb_info.tee_tcb_svn2)

    @pytest.mark.parametrize("size", [0, 1, 1023, 1025, 1184])
    def test_length(self, vectors: Path, size: int) -> None:
        data = (read(vectors, REPORT_V1) + bytes(200))[:size]
        with pytest.raises(EvidenceParseError, match=re.escape(f"`TDREPORT` length is 0x{size:x}, expected 0x400")):
            tdx.parse_td_report(data)

    def test_hash_check_detects_change(self, vectors: Path) -> None:
        report = tdx.parse_td_report(flip(read(vectors, REPORT_V1), 0x210))
        assert not report.tee_info_hash_ok()
        assert report.tee_tcb_info_hash_ok()


QUOTE_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parse_or_error_quote(data: bytes, policy: Trailing = Trailing.ANY) -> None:
    try:
        quote = tdx.parse_quote(data, trailing=policy)
    except EvidenceParseError:
        return
    assert quote.to_bytes() == data
    assert tdx.parse_quote(quote.to_bytes(), trailing=Trailing.ANY) == quote


class TestProperties:
    @QUOTE_SETTINGS
    @given(data=st.binary(max_size=1200))
    def test_random_bytes_quote(self, data: bytes) -> None:
        _parse_or_error_quote(data)

    @QUOTE_SETTINGS
    @given(version=st.sampled_from([4, 5]), body_type=st.sampled_from([2, 3]), rest=st.binary(min_size=0, max_size=900))
    def test_random_bytes_with_plausible_header(self, version: int, body_type: int, rest: bytes) -> None:
        head = struct.pack("<HHI", version, 2, 0x81) + bytes(40)
        if version == 5:
            head += struct.pack("<HI", body_type, 584 if body_type == 2 else 648)
        _parse_or_error_quote(head + rest)

    @QUOTE_SETTINGS
    @given(st.data())
    def test_mutated_real_quote(self, vectors: Path, data: st.DataObject) -> None:
        raw = bytearray(read(vectors, data.draw(st.sampled_from([V4, V5]))))
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(raw)))
        _parse_or_error_quote(bytes(raw[:cut]), data.draw(st.sampled_from(list(Trailing))))

    @QUOTE_SETTINGS
    @given(st.data())
    def test_mutated_real_td_report(self, vectors: Path, data: st.DataObject) -> None:
        raw = bytearray(read(vectors, data.draw(st.sampled_from([REPORT_V0, REPORT_V1]))))
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        try:
            report = tdx.parse_td_report(bytes(raw))
        except EvidenceParseError:
            return
        assert report.to_bytes() == bytes(raw)

    @QUOTE_SETTINGS
    @given(data=st.binary(min_size=1024, max_size=1024))
    def test_random_td_report(self, data: bytes) -> None:
        data = bytes((0x81, 0, data[2] & 1, 0)) + data[4:]
        try:
            report = tdx.parse_td_report(data)
        except EvidenceParseError:
            return
        assert report.to_bytes() == data
