"""The dev KBS's TDX and SNP verifiers: good bindings accepted, wrong report data / VMPL / shapes rejected (401)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cvm_tools.devkbs.core import DevKbsCore, Response
from cvm_tools.devkbs.server import DevKbsServer
from cvm_tools.devkbs.verifiers import verify_tdx

from agent.kbs import protocol
from agent.tee import ccel, eventlog
from tests.fakes.tsmfs import (
    DEFAULT_SNP_TEMPLATE,
    DEFAULT_TDX_TEMPLATE,
    snp_report_with,
    tdx_quote_registers,
    tdx_quote_with,
    tdx_quote_with_rtmrs,
)
from tests.paths import VECTORS_DIR as VECTORS

pytestmark = pytest.mark.integration

GCP = VECTORS / "hw" / "tdx" / "ccel_gcp_cos113"
PUBKEY = {
    "kty": "EC",
    "crv": "P-256",
    "alg": "ECDH-ES+A256KW",
    "x": "WKn-ZIGevcwGIyyrzFoZNBdaq9_TsqzGl96oc0CWuis",
    "y": "y77t-RvAHRKTsSGdIYUfweuOvwrvDD-Q3Hv5J0fSKbE",
}
INIT_DATA = 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = "x"\n'
MRCONFIGID_AT = 48 + 184  # quote v4: header + body offset of MRCONFIGID
HOST_DATA_AT = 0xC0

MakeEvidence = Callable[[bytes], object]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def auth(core: DevKbsCore, tee: str) -> tuple[str, str]:
    reply = core.handle("POST", "/kbs/v0/auth", {}, protocol.request_body(tee))
    assert reply.status == 200, reply.body
    return reply.headers["Set-Cookie"].split(";")[0], json.loads(reply.body)["nonce"]


def attestation(nonce: str, make_evidence: MakeEvidence, init_data: str | None) -> bytes:
    digest = protocol.binding_digest(protocol.runtime_data(nonce, PUBKEY))
    return protocol.attestation_body(
        nonce=nonce, tee_pubkey=PUBKEY, evidence=make_evidence(digest), init_data_toml=init_data
    )


def attest(tmp_path: Path, tee: str, make_evidence: MakeEvidence, init_data: str | None = None) -> Response:
    core = DevKbsCore(tmp_path)
    cookie, nonce = auth(core, tee)
    return core.handle("POST", "/kbs/v0/attest", {"cookie": cookie}, attestation(nonce, make_evidence, init_data))


def claims(reply: Response) -> dict[str, Any]:
    assert reply.status == 200, reply.body
    token = json.loads(reply.body)["token"]
    body = token.split(".")[1]
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    annotated: dict[str, Any] = payload["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
    return annotated


def assert_rejected(reply: Response) -> None:
    assert reply.status == 401
    assert json.loads(reply.body)["type"].endswith("/AttestationError")


def tdx_evidence(
    template: bytes = DEFAULT_TDX_TEMPLATE.read_bytes(), eventlog: bytes | None = None, pad: bytes | None = None
) -> MakeEvidence:
    def make(digest: bytes) -> object:
        quote = tdx_quote_with(template, pad if pad is not None else digest + bytes(16))
        return {"cc_eventlog": None if eventlog is None else b64(eventlog), "quote": b64(quote)}

    return make


def snp_evidence(vmpl: int = 0, host_data: bytes | None = None, report_data: bytes | None = None) -> MakeEvidence:
    from agent.tee import snp

    def make(digest: bytes) -> object:
        template = bytearray(DEFAULT_SNP_TEMPLATE.read_bytes())
        if host_data is not None:
            template[HOST_DATA_AT : HOST_DATA_AT + 32] = host_data
        raw = snp_report_with(bytes(template), report_data or digest + bytes(16), vmpl)
        return snp.snp_evidence(snp.parse_report(raw), None)

    return make


class TestTdx:
    def test_good_binding(self, tmp_path: Path) -> None:
        got = claims(attest(tmp_path, "tdx", tdx_evidence()))
        body = got["tdx"]["quote"]["body"]
        assert set(body) >= {"mr_td", "rtmr_0", "rtmr_3", "mr_config_id", "report_data", "tcb_svn", "xfam"}
        assert got["report_data"] == body["report_data"]
        assert got["tdx"]["ccel"] is None

    def test_event_log_replay(self, tmp_path: Path) -> None:
        eventlog = ccel.build_cc_eventlog((GCP / "ccel_data.bin").read_bytes(), None)
        template = (GCP / "quote_v4_padded8000.dat").read_bytes()
        got = claims(attest(tmp_path, "tdx", tdx_evidence(template, eventlog)))
        assert got["tdx"]["ccel"] == {"events": 43}
        # the same log against a quote whose RTMRs it does not produce
        assert_rejected(attest(tmp_path, "tdx", tdx_evidence(eventlog=eventlog)))

    def test_event_log_with_agent_entries(self, tmp_path: Path) -> None:
        """Firmware CCEL + AAEL entries: accepted when the quote's RTMR3 holds them, rejected otherwise."""
        texts = ['github.com/confidential-containers PullImage {"image":"a", "digest":"b"}', "w Start x"]
        events = [eventlog.measurement_entry(*t.split(" ", 2), rtmr=3) for t in texts]
        log = ccel.build_cc_eventlog((GCP / "ccel_data.bin").read_bytes(), b"".join(e.to_bytes() for e in events))
        assert log is not None
        template = (GCP / "quote_v4_padded8000.dat").read_bytes()
        rtmr3 = bytes(48)
        for event in events:
            rtmr3 = hashlib.sha384(rtmr3 + event.digests[0].digest).digest()
        full = tdx_quote_with_rtmrs(template, [*tdx_quote_registers(template)[4:7], rtmr3])
        got = claims(attest(tmp_path, "tdx", tdx_evidence(full, log)))
        assert got["tdx"]["ccel"] == {"events": 45}
        assert got["tdx"]["quote"]["body"]["rtmr_3"] == rtmr3.hex()
        # RTMR3 without the last extend: rejected, naming that entry
        first_only = hashlib.sha384(bytes(48) + events[0].digests[0].digest).digest()
        partial = tdx_quote_with_rtmrs(template, [*tdx_quote_registers(template)[4:7], first_only])
        assert_rejected(attest(tmp_path, "tdx", tdx_evidence(partial, log)))
        quote = tdx_quote_with(partial, bytes(64))
        evidence = {"cc_eventlog": b64(log), "quote": b64(quote)}
        with pytest.raises(ValueError, match=re.escape("(RTMR3 differ): entry 45 (agent, 'w Start x'): logged but")):
            verify_tdx("tdx", evidence, bytes(48), None)
        # an entry whose text was changed under its digest: the registers still replay, the digest check catches it
        tampered = log.replace(b"w Start x", b"w Start y")
        evidence = {"cc_eventlog": b64(tampered), "quote": b64(tdx_quote_with(full, bytes(64)))}
        with pytest.raises(ValueError, match=re.escape("(no register differ): entry 45 (agent, 'w Start y'): its")):
            verify_tdx("tdx", evidence, bytes(48), None)

    def test_wrong_report_data(self, tmp_path: Path) -> None:
        assert_rejected(attest(tmp_path, "tdx", tdx_evidence(pad=bytes(64))))

    def test_unpadded_digest_position(self, tmp_path: Path) -> None:
        assert_rejected(attest(tmp_path, "tdx", tdx_evidence(pad=bytes(16) + b"\x01" * 48)))

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda e: {**e, "aa_eventlog": None},  # the pre-0.15 shape
            lambda e: {"quote": e["quote"]},
            lambda e: {**e, "quote": "not base64!"},
            lambda e: {**e, "quote": b64(b"\x04\x00" + bytes(100))},
            lambda e: {**e, "cc_eventlog": b64(b"\x01" * 40)},
            lambda e: [e],
        ],
    )
    def test_malformed(self, tmp_path: Path, mangle: Callable[[Any], object]) -> None:
        make = tdx_evidence()
        assert_rejected(attest(tmp_path, "tdx", lambda digest: mangle(make(digest))))

    def test_init_data_against_mrconfigid(self, tmp_path: Path) -> None:
        template = bytearray(DEFAULT_TDX_TEMPLATE.read_bytes())
        digest = hashlib.sha384(INIT_DATA.encode()).digest()
        template[MRCONFIGID_AT : MRCONFIGID_AT + 48] = digest
        got = claims(attest(tmp_path, "tdx", tdx_evidence(bytes(template)), INIT_DATA))
        assert got["tdx"]["init_data"] == digest.hex()
        assert_rejected(attest(tmp_path, "tdx", tdx_evidence(), INIT_DATA))  # MRCONFIGID is zero there


class TestSnp:
    def test_good_binding(self, tmp_path: Path) -> None:
        got = claims(attest(tmp_path, "snp", snp_evidence()))["snp"]
        assert got["report_version"] == 2  # what the emulations produce; Trustee itself wants 3-5
        assert set(got) >= {"measurement", "host_data", "report_data", "policy_debug_allowed", "reported_tcb_snp"}
        assert got["cert_chain"] is None

    def test_wrong_vmpl(self, tmp_path: Path) -> None:
        assert_rejected(attest(tmp_path, "snp", snp_evidence(vmpl=1)))

    def test_wrong_report_data(self, tmp_path: Path) -> None:
        assert_rejected(attest(tmp_path, "snp", snp_evidence(report_data=b"\x01" * 64)))

    @pytest.mark.parametrize(
        "mangle",
        [
            lambda e: {**e, "extra": 1},
            lambda e: {"attestation_report": e["attestation_report"]},
            lambda e: {**e, "attestation_report": {**e["attestation_report"], "report_data": "AAAA"}},
            lambda e: {**e, "attestation_report": {**e["attestation_report"], "version": 9}},
            lambda e: {**e, "cert_chain": "VCEK"},
        ],
    )
    def test_malformed(self, tmp_path: Path, mangle: Callable[[Any], object]) -> None:
        make = snp_evidence()
        assert_rejected(attest(tmp_path, "snp", lambda digest: mangle(make(digest))))

    def test_init_data_against_host_data(self, tmp_path: Path) -> None:
        digest = hashlib.sha384(INIT_DATA.encode()).digest()
        got = claims(attest(tmp_path, "snp", snp_evidence(host_data=digest[:32]), INIT_DATA))
        assert got["snp"]["init_data"] == digest[:32].hex()
        assert_rejected(attest(tmp_path, "snp", snp_evidence(), INIT_DATA))

    def test_tdx_evidence_for_an_snp_session(self, tmp_path: Path) -> None:
        assert_rejected(attest(tmp_path, "snp", tdx_evidence()))


def test_rejection_over_http(tmp_path: Path) -> None:
    """Through the real server: 401 with Trustee's AttestationError body."""
    with DevKbsServer(tmp_path) as server:
        request = urllib.request.Request(f"{server.url}/kbs/v0/auth", data=protocol.request_body("snp"))
        with urllib.request.urlopen(request, timeout=10) as reply:
            cookie = reply.headers["Set-Cookie"].split(";")[0]
            nonce = json.loads(reply.read())["nonce"]
        body = attestation(nonce, snp_evidence(vmpl=1), None)
        request = urllib.request.Request(f"{server.url}/kbs/v0/attest", data=body, headers={"Cookie": cookie})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 401
        assert json.loads(info.value.read())["type"].endswith("/AttestationError")
        info.value.close()
