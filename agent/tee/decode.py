"""Decode evidence for people: quotes, reports and evidence JSON as named fields. Pure.

`decode(data)` recognises a raw TDX quote (v4/v5, trailing bytes allowed), a raw 1184-byte SNP report, a
1024-byte TD report, or evidence JSON of the `tdx`, `snp` and `sample` TEEs, and returns a JSON-able dict:

- `kind`, `tee`, `report_data` (hex);
- `measurements`: the values KBS reference values are built from (TDX: MRTD, RTMR0..3, MRCONFIGID, MROWNER,
  MROWNERCONFIG, MRSERVICETD; SNP: MEASUREMENT, HOST_DATA, ID/author key digests, family/image id);
- `tcb` (TDX: TEE_TCB_SVN, MRSEAM, ...; SNP: the four TCB versions decoded for the CPU generation, firmware
  versions, guest SVN), `attributes` (TDX) or `policy` and `platform_info` (SNP);
- TDX evidence: `event_log` (event count and the RTMRs the CCEL replays to, compared with the quote);
  SNP evidence: `cert_chain` (certificate types and sizes);
- `details`: every parsed field (the parsers' `to_dict()`).

`format_text` renders the same dict without `details` as indented `key: value` lines.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from agent.errors import EvidenceParseError
from agent.strictjson import load_json
from agent.tee import ccel, snp, tdx

__all__ = ["decode", "decode_evidence", "format_text"]

_TDX_TEE_TYPE = 0x81
_QUOTE_VERSIONS = (4, 5)
_QUOTE_HEADER_LEN = 48


def _tdx_quote(quote: tdx.TdxQuote) -> dict[str, Any]:
    body = quote.body
    measurements = {
        "mr_td": body.mr_td.hex(),
        **{f"rtmr{i}": value.hex() for i, value in enumerate(body.rtmrs)},
        "mr_config_id": body.mr_config_id.hex(),
        "mr_owner": body.mr_owner.hex(),
        "mr_owner_config": body.mr_owner_config.hex(),
    }
    tcb = {
        "tee_tcb_svn": body.tee_tcb_svn.hex(),
        "mr_seam": body.mr_seam.hex(),
        "mrsigner_seam": body.mrsigner_seam.hex(),
        "seam_attributes": body.seam_attributes.hex(),
    }
    if body.mr_servicetd is not None and body.tee_tcb_svn2 is not None:
        measurements["mr_servicetd"] = body.mr_servicetd.hex()
        tcb["tee_tcb_svn2"] = body.tee_tcb_svn2.hex()
    return {
        "kind": "tdx_quote",
        "tee": "tdx",
        "version": quote.version,
        "quote_len": len(quote.quote_bytes()),
        "trailing_len": len(quote.trailing),
        "report_data": body.report_data.hex(),
        "measurements": measurements,
        "tcb": tcb,
        "attributes": {
            "td_attributes": body.td_attributes.hex(),
            "td_attributes_decoded": tdx.decode_td_attributes(body.td_attributes),
            "xfam": body.xfam.hex(),
        },
        "details": quote.to_dict(),
    }


def _td_report(report: tdx.TdReport) -> dict[str, Any]:
    info, tcb = report.td_info, report.tee_tcb_info
    return {
        "kind": "tdx_td_report",
        "tee": "tdx",
        "version": report.version,
        "report_data": report.report_data.hex(),
        "measurements": {
            "mr_td": info.mr_td.hex(),
            **{f"rtmr{i}": value.hex() for i, value in enumerate(info.rtmrs)},
            "mr_config_id": info.mr_config_id.hex(),
            "mr_owner": info.mr_owner.hex(),
            "mr_owner_config": info.mr_owner_config.hex(),
            "servtd_hash": info.servtd_hash.hex(),
        },
        "tcb": {
            "cpusvn": report.cpusvn.hex(),
            "tee_tcb_svn": tcb.tee_tcb_svn.hex(),
            "mr_seam": tcb.mr_seam.hex(),
            "mr_signer_seam": tcb.mr_signer_seam.hex(),
            "tee_tcb_svn2": tcb.tee_tcb_svn2.hex(),
        },
        "attributes": {
            "td_attributes": info.attributes.hex(),
            "td_attributes_decoded": tdx.decode_td_attributes(info.attributes),
            "xfam": info.xfam.hex(),
        },
        "hashes_ok": {"tee_tcb_info_hash": report.tee_tcb_info_hash_ok(), "tee_info_hash": report.tee_info_hash_ok()},
        "details": report.to_dict(),
    }


def _snp_report(report: snp.AttestationReport) -> dict[str, Any]:
    details = report.to_dict()
    return {
        "kind": "snp_report",
        "tee": "snp",
        "version": report.version,
        "vmpl": report.vmpl,
        "signing_key": report.signing_key,
        "report_data": report.report_data.hex(),
        "measurements": {
            "measurement": report.measurement.hex(),
            "host_data": report.host_data.hex(),
            "id_key_digest": report.id_key_digest.hex(),
            "author_key_digest": report.author_key_digest.hex(),
            "family_id": report.family_id.hex(),
            "image_id": report.image_id.hex(),
        },
        "tcb": {
            "layout": details["tcb_layout"],
            "current_tcb": details["current_tcb"],
            "reported_tcb": details["reported_tcb"],
            "committed_tcb": details["committed_tcb"],
            "launch_tcb": details["launch_tcb"],
            "current_version": details["current_version"],
            "committed_version": details["committed_version"],
            "guest_svn": report.guest_svn,
        },
        "policy": {"raw": details["policy"], **details["policy_decoded"]},
        "platform_info": {"raw": details["platform_info"], **details["platform_info_decoded"]},
        "details": details,
    }


def _b64(value: object, key: str) -> bytes:
    if not isinstance(value, str):
        msg = f"`{key}` is {type(value).__name__}, expected a base64 string"
        raise EvidenceParseError(msg)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        msg = f"`{key}` is not valid standard base64"
        raise EvidenceParseError(msg) from exc


def _event_log(raw: bytes, quote: tdx.TdxQuote) -> dict[str, Any]:
    log = ccel.parse_event_log(raw)
    replayed = ccel.replay_rtmrs(log)
    return {
        "events": len(log.events),
        "bytes": len(raw),
        "replayed_rtmrs": {f"rtmr{i}": value.hex() for i, value in enumerate(replayed)},
        "rtmrs_match_quote": {f"rtmr{i}": value == quote.body.rtmrs[i] for i, value in enumerate(replayed)},
    }


def decode_tdx_evidence(obj: Mapping[str, Any]) -> dict[str, Any]:
    quote = tdx.parse_quote(_b64(obj["quote"], "quote"), trailing=tdx.Trailing.ANY)
    out = {**_tdx_quote(quote), "kind": "tdx_evidence"}
    eventlog = obj.get("cc_eventlog")
    out["event_log"] = None if eventlog is None else _event_log(_b64(eventlog, "cc_eventlog"), quote)
    return out


def decode_snp_evidence(obj: Mapping[str, Any]) -> dict[str, Any]:
    report = snp.report_from_sev_json(obj["attestation_report"])
    out = {**_snp_report(report), "kind": "snp_evidence"}
    chain = obj.get("cert_chain")
    if chain is None:
        out["cert_chain"] = None
    else:
        table = snp.cert_table_from_sev_json(chain)
        out["cert_chain"] = [{"cert_type": e.cert_type.name, "length": len(e.data)} for e in table.entries]
    return out


def decode_sample_evidence(obj: Mapping[str, Any]) -> dict[str, Any]:
    if set(obj) != {"svn", "report_data"}:
        msg = f"sample evidence keys are {sorted(obj)}, expected ['report_data', 'svn']"
        raise EvidenceParseError(msg)
    return {
        "kind": "sample_evidence",
        "tee": "sample",
        "svn": obj["svn"],
        "report_data": _b64(obj["report_data"], "report_data").hex(),
        "measurements": {},
        "warning": "the sample TEE is a mock: nothing here is measured or signed",
    }


def decode_evidence(obj: object) -> dict[str, Any]:
    """Decode a parsed evidence JSON object of any TEE in the registry (its identifying keys decide)."""
    from agent.tee.registry import TEES

    if not isinstance(obj, Mapping):
        msg = f"evidence is {type(obj).__name__}, expected a JSON object"
        raise EvidenceParseError(msg)
    for entry in TEES:
        if entry.evidence_keys <= obj.keys():
            return entry.decode_evidence(obj)
    names = [str(entry.kind) for entry in TEES]
    msg = f"evidence keys are {sorted(obj)}, expected those of {', '.join(names[:-1])} or {names[-1]} evidence"
    raise EvidenceParseError(msg)


def decode(data: bytes) -> dict[str, Any]:
    """Decode a raw TDX quote, SNP report, TD report, or evidence JSON (see the module docstring)."""
    text = data.strip()
    if text.startswith(b"{"):
        try:
            obj = load_json(text, "the evidence JSON", error=ValueError)
        except ValueError as exc:
            msg = f"the input starts like JSON but does not parse: {exc}"
            raise EvidenceParseError(msg) from None
        return decode_evidence(obj)
    if len(data) == snp.SNP_REPORT_LEN:
        return _snp_report(snp.parse_report(data))
    if len(data) == tdx.TDX_REPORT_LEN and data[0] == _TDX_TEE_TYPE:
        return _td_report(tdx.parse_td_report(data))
    if (
        len(data) >= _QUOTE_HEADER_LEN
        and int.from_bytes(data[0:2], "little") in _QUOTE_VERSIONS
        and int.from_bytes(data[4:8], "little") == _TDX_TEE_TYPE
    ):
        return _tdx_quote(tdx.parse_quote(data, trailing=tdx.Trailing.ANY))
    msg = (
        f"{len(data)} bytes starting {data[:8].hex()} are not a TDX quote, a TD report (1024 bytes), an SNP "
        "report (1184 bytes) or evidence JSON"
    )
    raise EvidenceParseError(msg, offset=0)


def _lines(value: object, indent: int) -> list[str]:
    pad = "  " * indent
    out: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Mapping | list) and item:
                out.append(f"{pad}{key}:")
                out.extend(_lines(item, indent + 1))
            else:
                out.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping):
                inner = _lines(item, indent + 1)
                out.append(f"{pad}- {inner[0].strip()}")
                out.extend(inner[1:])
            else:
                out.append(f"{pad}- {_scalar(item)}")
    return out


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping | list):
        return "{}" if isinstance(value, Mapping) else "[]"
    return str(value)


def format_text(decoded: Mapping[str, Any]) -> str:
    """Readable `key: value` lines for a `decode()` result (without the raw `details`)."""
    return "\n".join(_lines({k: v for k, v in decoded.items() if k != "details"}, 0)) + "\n"
