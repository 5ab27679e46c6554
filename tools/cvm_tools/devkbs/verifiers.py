"""Development-KBS verifiers for TDX and SEV-SNP evidence: structure and binding only, NO signature checks.

A `Verifier` is `(tee, evidence, digest, init_data_toml) -> claims`; it raises ValueError/TypeError/KeyError to
reject (the KBS answers 401 AttestationError). What is checked, as Trustee's verifiers do (kbs-protocol.md §11):

- **tdx**: evidence is exactly `{"cc_eventlog": <base64 std> | null, "quote": <base64 std>}`; the quote parses
  (v4 or v5; trailing zero padding allowed); REPORTDATA = the 48-byte digest zero-padded to 64; when
  `cc_eventlog` is present it parses, its replay equals RTMR0..3 and every attestation-agent (AAEL) entry's
  digest is H(its event data) (a mismatch is rejected naming the first entry that diverges); with init-data,
  MRCONFIGID = the init-data digest (its `algorithm`) zero-padded to 48.
- **snp**: evidence is exactly `{"attestation_report": {...}, "cert_chain": [...] | null}`, rebuilt with
  `snp.report_from_sev_json` / `cert_table_from_sev_json`; VMPL must be 0; REPORT_DATA = the digest zero-padded to
  64; with init-data, HOST_DATA = the digest zero-padded or truncated to 32. Report versions 2-5 are accepted:
  Trustee accepts only 3-5, but the emulations (tsmfs, the ioctl shim) and older firmware produce version 2, so
  the claims carry `report_version` and the start-up warning says this is not Trustee.

Claims resemble Trustee's `tdx` / `snp` claims (hex strings): measurements, TCB values, report_data, init_data.
The quote and report signatures, the PCK / VCEK chains and the TCB status are NOT verified: this is a development
tool that proves the agent's plumbing, not the platform.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from agent.errors import ConfigError, EvidenceParseError
from agent.initdata import binding_value, parse_initdata
from agent.tee import ccel, eventlog, snp, tdx

__all__ = ["HARDWARE_VERIFIERS", "verify_snp", "verify_tdx"]

_TDX_KEYS = ("cc_eventlog", "quote")
_SNP_KEYS = ("attestation_report", "cert_chain")
_SNP_VERSIONS = (2, 3, 4, 5)


def _b64(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        msg = f"`{key}` is {type(value).__name__}, expected a base64 string"
        raise TypeError(msg)
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        msg = f"`{key}` is not valid standard base64"
        raise ValueError(msg) from exc


def _keys(evidence: object, expected: tuple[str, ...], tee: str) -> Mapping[str, Any]:
    if not isinstance(evidence, Mapping) or set(evidence) != set(expected):
        got = sorted(evidence) if isinstance(evidence, Mapping) else type(evidence).__name__
        msg = f"{tee} evidence has keys {got}, expected exactly {list(expected)}"
        raise TypeError(msg)
    return evidence


def init_data_digest(init_data: str) -> bytes:
    """Digest of the exact init-data TOML text with its `algorithm` (kbs-protocol.md §5.3); ValueError if bad."""
    try:
        return parse_initdata(init_data.encode("utf-8"), source="init-data").digest
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


def verify_tdx(tee: str, evidence: object, digest: bytes, init_data: str | None) -> dict[str, Any]:
    """Structure and report-data binding of TDX evidence; returns Trustee-like `tdx` claims."""
    obj = _keys(evidence, _TDX_KEYS, "tdx")
    try:
        quote = tdx.parse_quote(_b64(obj["quote"], "quote"))
        log = None
        if obj["cc_eventlog"] is not None:
            raw = _b64(obj["cc_eventlog"], "cc_eventlog")
            log = ccel.parse_event_log(raw)
            replay = eventlog.replay(eventlog.items_from_cc_eventlog(raw), quote.body.rtmrs)
    except EvidenceParseError as exc:
        raise ValueError(str(exc)) from exc
    body = quote.body
    if body.report_data != binding_value(digest, 64):
        msg = "TDX REPORTDATA does not match the runtime data digest (zero-padded to 64 bytes)"
        raise ValueError(msg)
    if log is not None and replay.divergence is not None:
        mismatched = [f"RTMR{r.rtmr}" for r in replay.registers if not r.matches] or ["no register"]
        msg = (
            f"the cc_eventlog does not replay to the quote ({', '.join(mismatched)} differ): "
            f"{replay.divergence.describe()}"
        )
        raise ValueError(msg)
    claims: dict[str, Any] = {
        "quote": {
            "header": {"version": quote.version, "tee_type": "81000000"},
            "body": {
                "mr_td": body.mr_td.hex(),
                "mr_config_id": body.mr_config_id.hex(),
                "mr_owner": body.mr_owner.hex(),
                "mr_owner_config": body.mr_owner_config.hex(),
                "mr_seam": body.mr_seam.hex(),
                "mrsigner_seam": body.mrsigner_seam.hex(),
                **{f"rtmr_{i}": value.hex() for i, value in enumerate(body.rtmrs)},
                "seam_attributes": body.seam_attributes.hex(),
                "td_attributes": body.td_attributes.hex(),
                "tcb_svn": body.tee_tcb_svn.hex(),
                "xfam": body.xfam.hex(),
                "report_data": body.report_data.hex(),
            },
        },
        "td_attributes": tdx.decode_td_attributes(body.td_attributes),
        "report_data": body.report_data.hex(),
        "ccel": None if log is None else {"events": len(log.events)},
    }
    if body.mr_servicetd is not None:
        claims["quote"]["body"]["mr_servicetd"] = body.mr_servicetd.hex()
    if init_data is not None:
        expected = binding_value(init_data_digest(init_data), 48)
        if body.mr_config_id != expected:
            msg = "TDX MRCONFIGID does not match the init-data digest (zero-padded to 48 bytes)"
            raise ValueError(msg)
        claims["init_data"] = expected.hex()
    return claims


def verify_snp(tee: str, evidence: object, digest: bytes, init_data: str | None) -> dict[str, Any]:
    """Structure and report-data binding of SNP evidence; returns Trustee-like `snp` claims."""
    obj = _keys(evidence, _SNP_KEYS, "snp")
    try:
        report = snp.report_from_sev_json(obj["attestation_report"])
        certs = None if obj["cert_chain"] is None else snp.cert_table_from_sev_json(obj["cert_chain"])
    except EvidenceParseError as exc:
        raise ValueError(str(exc)) from exc
    if report.version not in _SNP_VERSIONS:  # pragma: no cover - the parser accepts exactly these
        msg = f"SNP report version {report.version} is not accepted"
        raise ValueError(msg)
    if report.vmpl != 0:
        msg = f"SNP report VMPL is {report.vmpl}, expected 0"
        raise ValueError(msg)
    if report.report_data != binding_value(digest, 64):
        msg = "SNP REPORT_DATA does not match the runtime data digest (zero-padded to 64 bytes)"
        raise ValueError(msg)
    reported = report.tcb(report.reported_tcb)
    policy = snp.decode_policy(report.policy)
    claims: dict[str, Any] = {
        "report_version": report.version,
        "measurement": report.measurement.hex(),
        "host_data": report.host_data.hex(),
        "report_data": report.report_data.hex(),
        "policy_abi_major": str(policy["abi_major"]),
        "policy_abi_minor": str(policy["abi_minor"]),
        "policy_smt_allowed": bool(policy["smt"]),
        "policy_migrate_ma": bool(policy["migrate_ma"]),
        "policy_debug_allowed": bool(policy["debug"]),
        "policy_single_socket": bool(policy["single_socket"]),
        "reported_tcb_bootloader": str(reported.bootloader),
        "reported_tcb_tee": str(reported.tee),
        "reported_tcb_snp": str(reported.snp),
        "reported_tcb_microcode": str(reported.microcode),
        "platform_smt_enabled": bool(report.platform_info & 1),
        "guest_svn": report.guest_svn,
        "signing_key": report.signing_key,
        "cert_chain": None if certs is None else [e.cert_type.name for e in certs.entries],
    }
    if init_data is not None:
        expected = binding_value(init_data_digest(init_data), 32)
        if report.host_data != expected:
            msg = "SNP HOST_DATA does not match the init-data digest (zero-padded/truncated to 32 bytes)"
            raise ValueError(msg)
        claims["init_data"] = expected.hex()
    return claims


HARDWARE_VERIFIERS = {"tdx": verify_tdx, "snp": verify_snp}
