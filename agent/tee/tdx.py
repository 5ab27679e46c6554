"""Intel TDX evidence layouts: the TD report (TDREPORT_STRUCT) and TD quotes v4 and v5. Pure.

Layouts follow hw-abi.md §6.1-§6.3 (Intel TDX module ABI, DCAP `sgx_quote_4.h` / `sgx_quote_5.h`); all integers
are little-endian. Every parser has a serialiser and `parse_x(b).to_bytes() == b` holds for every accepted input.

Strictness: lengths are checked before slicing, the version is detected first, unknown versions / TEE types /
attestation key types / body types are rejected, and must-be-zero reserved ranges must be zero (they are not
stored; the serialiser writes zeros back). Only `EvidenceParseError` leaves a parser.

Quote lengths and trailing bytes: a quote's own length is `header + body + 4 + signature_data_len`; the file or
configfs `outblob` is often longer (QGS buffers are zero-padded to 5006 or 8000 bytes; a go-tdx-guest test file has
ASCII text appended). `parse_quote` always slices at the quote's own length and applies a `Trailing` policy to the
rest: `REJECT` (nothing may follow), `ZEROS` (the default: only 0x00 padding may follow) or `ANY`. Accepted trailing
bytes are kept verbatim in `TdxQuote.trailing`, so `to_bytes()` reproduces the input and `quote_bytes()` gives the
quote alone.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from agent.errors import EvidenceParseError
from agent.tee._layout import Span as _Span
from agent.tee._layout import check_size as _check_size
from agent.tee._layout import require_zero as _require_zero
from agent.tee._layout import take as _take
from agent.tee._layout import u16 as _u16
from agent.tee._layout import u32 as _u32

__all__ = [
    "TDX_REPORT_LEN",
    "CertificationData",
    "CertificationDataType",
    "QeReportCertificationData",
    "QuoteHeader",
    "QuoteSignatureData",
    "TdInfo",
    "TdQuoteBody",
    "TdReport",
    "TdxQuote",
    "TeeTcbInfo",
    "Trailing",
    "decode_td_attributes",
    "parse_quote",
    "parse_td_report",
]


# --- TDREPORT_STRUCT (1024 bytes), hw-abi.md §6.1; kernel `TDX_REPORT_LEN` -------------------------------------
TDX_REPORT_LEN = 0x400
# REPORTMACSTRUCT (256 bytes @0)
_TDR_REPORTTYPE = _Span(0x000, 4)  # type, subtype, version, reserved
_TDR_RESERVED_MAC1 = _Span(0x004, 12)
_TDR_CPUSVN = _Span(0x010, 16)
_TDR_TEE_TCB_INFO_HASH = _Span(0x020, 48)
_TDR_TEE_INFO_HASH = _Span(0x050, 48)
_TDR_REPORTDATA = _Span(0x080, 64)
_TDR_RESERVED_MAC2 = _Span(0x0C0, 32)
_TDR_MAC = _Span(0x0E0, 32)
# TEE_TCB_INFO (239 bytes @256)
_TDR_TEE_TCB_INFO = _Span(0x100, 239)
_TDR_TCB_VALID = _Span(0x100, 8)
_TDR_TCB_TEE_TCB_SVN = _Span(0x108, 16)
_TDR_TCB_MRSEAM = _Span(0x118, 48)
_TDR_TCB_MRSIGNERSEAM = _Span(0x148, 48)
_TDR_TCB_ATTRIBUTES = _Span(0x178, 8)
_TDR_TCB_TEE_TCB_SVN2 = _Span(0x180, 16)  # TDX 1.5; present (sometimes non-zero) in version-0 reports too
_TDR_TCB_RESERVED = _Span(0x190, 95)
_TDR_RESERVED_GAP = _Span(0x1EF, 17)
# TDINFO (512 bytes @512)
_TDR_TD_INFO = _Span(0x200, 512)
_TDR_TD_ATTRIBUTES = _Span(0x200, 8)
_TDR_TD_XFAM = _Span(0x208, 8)
_TDR_TD_MRTD = _Span(0x210, 48)
_TDR_TD_MRCONFIGID = _Span(0x240, 48)
_TDR_TD_MROWNER = _Span(0x270, 48)
_TDR_TD_MROWNERCONFIG = _Span(0x2A0, 48)
_TDR_TD_RTMR0 = _Span(0x2D0, 48)  # RTMR1..3 follow at 48-byte steps
_TDR_TD_SERVTD_HASH = _Span(0x390, 48)  # REPORTTYPE.version 1 only; must be zero in version 0
_TDR_TD_RESERVED = _Span(0x3C0, 64)

_REPORTTYPE_TDX = 0x81
_REPORTTYPE_SUBTYPE = 0
_REPORT_VERSIONS = (0, 1)  # 0: TDX 1.0 layout (no SERVTD_HASH), 1: TDX 1.5

# --- TD quote header (48 bytes), hw-abi.md §6.2 ------------------------------------------------------------------
_QH_LEN = 48
_QH_VERSION = _Span(0, 2)
_QH_ATT_KEY_TYPE = _Span(2, 2)
_QH_TEE_TYPE = _Span(4, 4)
_QH_RESERVED = _Span(8, 4)  # qe_svn/pce_svn in SGX v3 quotes; always zero in TDX quotes
_QH_QE_VENDOR_ID = _Span(12, 16)
_QH_USER_DATA = _Span(28, 20)

_QUOTE_V4 = 4
_QUOTE_V5 = 5
_ATT_KEY_ECDSA_P256 = 2
_TEE_TYPE_TDX = 0x81

# --- v5 body descriptor @48 (6 bytes), hw-abi.md §6.3 -------------------------------------------------------------
_Q5_DESC_LEN = 6
_Q5_BODY_TDX10 = 2
_Q5_BODY_TDX15 = 3
_Q5_BODY_SGX = 1

# --- TD quote body (offsets relative to the body), hw-abi.md §6.2/§6.3 -----------------------------------------
_BODY10_LEN = 584
_BODY15_LEN = 648
_QB_TEE_TCB_SVN = _Span(0, 16)
_QB_MR_SEAM = _Span(16, 48)
_QB_MRSIGNER_SEAM = _Span(64, 48)
_QB_SEAM_ATTRIBUTES = _Span(112, 8)
_QB_TD_ATTRIBUTES = _Span(120, 8)
_QB_XFAM = _Span(128, 8)
_QB_MR_TD = _Span(136, 48)
_QB_MR_CONFIG_ID = _Span(184, 48)
_QB_MR_OWNER = _Span(232, 48)
_QB_MR_OWNER_CONFIG = _Span(280, 48)
_QB_RTMR0 = _Span(328, 48)  # RTMR1..3 follow at 48-byte steps
_QB_REPORT_DATA = _Span(520, 64)
_QB_TEE_TCB_SVN2 = _Span(584, 16)  # TDX 1.5 body only
_QB_MR_SERVICETD = _Span(600, 48)  # TDX 1.5 body only

# --- signature data (after the u32 signature_data_len), hw-abi.md §6.2 -------------------------------------------
_SIG_ECDSA = _Span(0, 64)  # r || s, big-endian, over quote bytes [0, header + body)
_SIG_ATTEST_KEY = _Span(64, 64)  # x || y, big-endian
_SIG_CERT_HEADER = 128  # certification data: type u16, size u32, data
_CERT_HEADER_LEN = 6
# QE report certification data (type 6)
_QE_REPORT_LEN = 384  # SGX REPORT of the QE
_QE_REPORT_DATA = _Span(320, 64)  # REPORTDATA inside the SGX report body
_QE_REPORT_SIG_LEN = 64
_QE_AUTH_SIZE_LEN = 2

_HASH_LEN = 48
_RTMR_COUNT = 4


class CertificationDataType(enum.IntEnum):
    """Certification data types of the ECDSA quote signature data (DCAP)."""

    PPID_CLEARTEXT = 1
    PPID_RSA2048 = 2
    PPID_RSA3072 = 3
    PCK_CERT = 4
    PCK_CERT_CHAIN = 5
    QE_REPORT = 6
    PLATFORM_MANIFEST = 7


class Trailing(enum.Enum):
    """What `parse_quote` accepts after the quote's own end (see the module docstring)."""

    REJECT = "reject"
    ZEROS = "zeros"
    ANY = "any"


# --- helpers -----------------------------------------------------------------------------------------------------


def _fail(message: str, offset: int | None = None) -> EvidenceParseError:
    return EvidenceParseError(message, offset=offset)


def _check_rtmrs(name: str, rtmrs: tuple[bytes, ...]) -> None:
    if len(rtmrs) != _RTMR_COUNT:
        msg = f"`{name}` count is {len(rtmrs)}, expected {_RTMR_COUNT}"
        raise ValueError(msg)
    for i, value in enumerate(rtmrs):
        _check_size(f"{name}[{i}]", value, _HASH_LEN)


def _rtmrs(data: bytes, first: _Span, base: int = 0) -> tuple[bytes, bytes, bytes, bytes]:
    start = base + first.start
    r = [data[start + i * _HASH_LEN : start + (i + 1) * _HASH_LEN] for i in range(_RTMR_COUNT)]
    return (r[0], r[1], r[2], r[3])


_TD_ATTRIBUTE_BITS = {
    "debug": 0,
    "sept_ve_disable": 28,
    "migratable": 29,
    "protection_keys": 30,
    "key_locker": 31,
    "perfmon": 63,
}


def decode_td_attributes(attributes: bytes) -> dict[str, bool]:
    """Decode the well-known bits of the 8-byte TD ATTRIBUTES field (little-endian u64)."""
    _check_size("attributes", attributes, 8)
    value = int.from_bytes(attributes, "little")
    return {name: bool(value >> bit & 1) for name, bit in _TD_ATTRIBUTE_BITS.items()}


# --- TD report ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TeeTcbInfo:
    """TEE_TCB_INFO: the TDX module's identity and SVNs (239 bytes @256 of the TD report)."""

    valid: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    attributes: bytes
    tee_tcb_svn2: bytes

    def __post_init__(self) -> None:
        _check_size("valid", self.valid, _TDR_TCB_VALID.size)
        _check_size("tee_tcb_svn", self.tee_tcb_svn, 16)
        _check_size("mr_seam", self.mr_seam, _HASH_LEN)
        _check_size("mr_signer_seam", self.mr_signer_seam, _HASH_LEN)
        _check_size("attributes", self.attributes, 8)
        _check_size("tee_tcb_svn2", self.tee_tcb_svn2, 16)

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid.hex(),
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "mr_seam": self.mr_seam.hex(),
            "mr_signer_seam": self.mr_signer_seam.hex(),
            "attributes": self.attributes.hex(),
            "tee_tcb_svn2": self.tee_tcb_svn2.hex(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TdInfo:
    """TDINFO: the TD's measurements (512 bytes @512 of the TD report)."""

    attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    servtd_hash: bytes

    def __post_init__(self) -> None:
        _check_size("attributes", self.attributes, 8)
        _check_size("xfam", self.xfam, 8)
        for name in ("mr_td", "mr_config_id", "mr_owner", "mr_owner_config", "servtd_hash"):
            _check_size(name, getattr(self, name), _HASH_LEN)
        _check_rtmrs("rtmrs", self.rtmrs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attributes": self.attributes.hex(),
            "attributes_decoded": decode_td_attributes(self.attributes),
            "xfam": self.xfam.hex(),
            "mr_td": self.mr_td.hex(),
            "mr_config_id": self.mr_config_id.hex(),
            "mr_owner": self.mr_owner.hex(),
            "mr_owner_config": self.mr_owner_config.hex(),
            **{f"rtmr{i}": value.hex() for i, value in enumerate(self.rtmrs)},
            "servtd_hash": self.servtd_hash.hex(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TdReport:
    """TDREPORT_STRUCT as returned by TDG.MR.REPORT (`TDX_CMD_GET_REPORT0`), 1024 bytes.

    `version` is REPORTTYPE.version: 0 (TDX 1.0 layout, SERVTD_HASH must be zero) or 1 (TDX 1.5).
    """

    version: int
    cpusvn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    mac: bytes
    tee_tcb_info: TeeTcbInfo
    td_info: TdInfo

    def __post_init__(self) -> None:
        if self.version not in _REPORT_VERSIONS:
            msg = f"`version` is {self.version}, expected one of {_REPORT_VERSIONS}"
            raise ValueError(msg)
        _check_size("cpusvn", self.cpusvn, 16)
        _check_size("tee_tcb_info_hash", self.tee_tcb_info_hash, _HASH_LEN)
        _check_size("tee_info_hash", self.tee_info_hash, _HASH_LEN)
        _check_size("report_data", self.report_data, 64)
        _check_size("mac", self.mac, 32)
        if self.version == 0 and any(self.td_info.servtd_hash):
            msg = "`servtd_hash` must be zero in a version-0 TD report"
            raise ValueError(msg)

    def to_bytes(self) -> bytes:
        out = bytearray(TDX_REPORT_LEN)

        def put(span: _Span, value: bytes) -> None:
            out[span.start : span.end] = value

        put(_TDR_REPORTTYPE, bytes((_REPORTTYPE_TDX, _REPORTTYPE_SUBTYPE, self.version, 0)))
        put(_TDR_CPUSVN, self.cpusvn)
        put(_TDR_TEE_TCB_INFO_HASH, self.tee_tcb_info_hash)
        put(_TDR_TEE_INFO_HASH, self.tee_info_hash)
        put(_TDR_REPORTDATA, self.report_data)
        put(_TDR_MAC, self.mac)
        tcb = self.tee_tcb_info
        put(_TDR_TCB_VALID, tcb.valid)
        put(_TDR_TCB_TEE_TCB_SVN, tcb.tee_tcb_svn)
        put(_TDR_TCB_MRSEAM, tcb.mr_seam)
        put(_TDR_TCB_MRSIGNERSEAM, tcb.mr_signer_seam)
        put(_TDR_TCB_ATTRIBUTES, tcb.attributes)
        put(_TDR_TCB_TEE_TCB_SVN2, tcb.tee_tcb_svn2)
        td = self.td_info
        put(_TDR_TD_ATTRIBUTES, td.attributes)
        put(_TDR_TD_XFAM, td.xfam)
        put(_TDR_TD_MRTD, td.mr_td)
        put(_TDR_TD_MRCONFIGID, td.mr_config_id)
        put(_TDR_TD_MROWNER, td.mr_owner)
        put(_TDR_TD_MROWNERCONFIG, td.mr_owner_config)
        for i, value in enumerate(td.rtmrs):
            put(_Span(_TDR_TD_RTMR0.start + i * _HASH_LEN, _HASH_LEN), value)
        put(_TDR_TD_SERVTD_HASH, td.servtd_hash)
        return bytes(out)

    def tee_tcb_info_hash_ok(self) -> bool:
        """Whether TEE_TCB_INFO_HASH equals SHA-384 of the serialised TEE_TCB_INFO (bytes 256..494)."""
        raw = _take(self.to_bytes(), _TDR_TEE_TCB_INFO)
        return hashlib.sha384(raw).digest() == self.tee_tcb_info_hash

    def tee_info_hash_ok(self) -> bool:
        """Whether TEE_INFO_HASH equals SHA-384 of the serialised TDINFO (bytes 512..1023)."""
        raw = _take(self.to_bytes(), _TDR_TD_INFO)
        return hashlib.sha384(raw).digest() == self.tee_info_hash

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tdx_td_report",
            "report_type": {"type": _REPORTTYPE_TDX, "subtype": _REPORTTYPE_SUBTYPE, "version": self.version},
            "cpusvn": self.cpusvn.hex(),
            "tee_tcb_info_hash": self.tee_tcb_info_hash.hex(),
            "tee_info_hash": self.tee_info_hash.hex(),
            "report_data": self.report_data.hex(),
            "mac": self.mac.hex(),
            "tee_tcb_info": self.tee_tcb_info.to_dict(),
            "td_info": self.td_info.to_dict(),
        }


def parse_td_report(data: bytes) -> TdReport:
    """Parse a 1024-byte TDREPORT_STRUCT. The MAC is not (cannot be) verified here."""
    if len(data) != TDX_REPORT_LEN:
        msg = f"`TDREPORT` length is 0x{len(data):x}, expected 0x{TDX_REPORT_LEN:x}"
        raise _fail(msg, 0)
    rtype, subtype, version, _ = _take(data, _TDR_REPORTTYPE)
    if rtype != _REPORTTYPE_TDX:
        msg = f"`REPORTTYPE.type` is 0x{rtype:x}, expected 0x{_REPORTTYPE_TDX:x}"
        raise _fail(msg, 0)
    if subtype != _REPORTTYPE_SUBTYPE:
        msg = f"`REPORTTYPE.subtype` is 0x{subtype:x}, expected 0x{_REPORTTYPE_SUBTYPE:x}"
        raise _fail(msg, 1)
    if version not in _REPORT_VERSIONS:
        msg = f"`REPORTTYPE.version` is 0x{version:x}, expected 0x0 or 0x1"
        raise _fail(msg, 2)
    _require_zero(data, _Span(3, 1), "`REPORTTYPE` reserved")
    _require_zero(data, _TDR_RESERVED_MAC1, "`REPORTMACSTRUCT` reserved")
    _require_zero(data, _TDR_RESERVED_MAC2, "`REPORTMACSTRUCT` reserved")
    _require_zero(data, _TDR_TCB_RESERVED, "`TEE_TCB_INFO` reserved")
    _require_zero(data, _TDR_RESERVED_GAP, "`TDREPORT` reserved")
    _require_zero(data, _TDR_TD_RESERVED, "`TDINFO` reserved")
    if version == 0:
        _require_zero(data, _TDR_TD_SERVTD_HASH, "`SERVTD_HASH` (version 0)")
    tcb = TeeTcbInfo(
        valid=_take(data, _TDR_TCB_VALID),
        tee_tcb_svn=_take(data, _TDR_TCB_TEE_TCB_SVN),
        mr_seam=_take(data, _TDR_TCB_MRSEAM),
        mr_signer_seam=_take(data, _TDR_TCB_MRSIGNERSEAM),
        attributes=_take(data, _TDR_TCB_ATTRIBUTES),
        tee_tcb_svn2=_take(data, _TDR_TCB_TEE_TCB_SVN2),
    )
    td = TdInfo(
        attributes=_take(data, _TDR_TD_ATTRIBUTES),
        xfam=_take(data, _TDR_TD_XFAM),
        mr_td=_take(data, _TDR_TD_MRTD),
        mr_config_id=_take(data, _TDR_TD_MRCONFIGID),
        mr_owner=_take(data, _TDR_TD_MROWNER),
        mr_owner_config=_take(data, _TDR_TD_MROWNERCONFIG),
        rtmrs=_rtmrs(data, _TDR_TD_RTMR0),
        servtd_hash=_take(data, _TDR_TD_SERVTD_HASH),
    )
    return TdReport(
        version=version,
        cpusvn=_take(data, _TDR_CPUSVN),
        tee_tcb_info_hash=_take(data, _TDR_TEE_TCB_INFO_HASH),
        tee_info_hash=_take(data, _TDR_TEE_INFO_HASH),
        report_data=_take(data, _TDR_REPORTDATA),
        mac=_take(data, _TDR_MAC),
        tee_tcb_info=tcb,
        td_info=td,
    )


# --- TD quote ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteHeader:
    """The 48-byte quote header. `version` is 4 or 5; key type ECDSA P-256 and TEE type TDX are implied."""

    version: int
    qe_vendor_id: bytes
    user_data: bytes

    def __post_init__(self) -> None:
        if self.version not in (_QUOTE_V4, _QUOTE_V5):
            msg = f"`version` is {self.version}, expected 4 or 5"
            raise ValueError(msg)
        _check_size("qe_vendor_id", self.qe_vendor_id, 16)
        _check_size("user_data", self.user_data, 20)

    def to_bytes(self) -> bytes:
        return (
            struct.pack("<HHI", self.version, _ATT_KEY_ECDSA_P256, _TEE_TYPE_TDX)
            + bytes(_QH_RESERVED.size)
            + self.qe_vendor_id
            + self.user_data
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "att_key_type": _ATT_KEY_ECDSA_P256,
            "tee_type": _TEE_TYPE_TDX,
            "qe_vendor_id": self.qe_vendor_id.hex(),
            "user_data": self.user_data.hex(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TdQuoteBody:
    """TD quote body: 1.0 (584 bytes) when `tee_tcb_svn2`/`mr_servicetd` are None, else 1.5 (648 bytes)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mrsigner_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    def __post_init__(self) -> None:
        _check_size("tee_tcb_svn", self.tee_tcb_svn, 16)
        for name in ("mr_seam", "mrsigner_seam", "mr_td", "mr_config_id", "mr_owner", "mr_owner_config"):
            _check_size(name, getattr(self, name), _HASH_LEN)
        for name in ("seam_attributes", "td_attributes", "xfam"):
            _check_size(name, getattr(self, name), 8)
        _check_rtmrs("rtmrs", self.rtmrs)
        _check_size("report_data", self.report_data, 64)
        if (self.tee_tcb_svn2 is None) != (self.mr_servicetd is None):
            msg = "`tee_tcb_svn2` and `mr_servicetd` must both be set (TDX 1.5 body) or both be None"
            raise ValueError(msg)
        if self.tee_tcb_svn2 is not None and self.mr_servicetd is not None:
            _check_size("tee_tcb_svn2", self.tee_tcb_svn2, 16)
            _check_size("mr_servicetd", self.mr_servicetd, _HASH_LEN)

    @property
    def is_tdx15(self) -> bool:
        return self.tee_tcb_svn2 is not None

    def to_bytes(self) -> bytes:
        parts = [
            self.tee_tcb_svn,
            self.mr_seam,
            self.mrsigner_seam,
            self.seam_attributes,
            self.td_attributes,
            self.xfam,
            self.mr_td,
            self.mr_config_id,
            self.mr_owner,
            self.mr_owner_config,
            *self.rtmrs,
            self.report_data,
        ]
        if self.tee_tcb_svn2 is not None and self.mr_servicetd is not None:
            parts += [self.tee_tcb_svn2, self.mr_servicetd]
        return b"".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tee_tcb_svn": self.tee_tcb_svn.hex(),
            "mr_seam": self.mr_seam.hex(),
            "mrsigner_seam": self.mrsigner_seam.hex(),
            "seam_attributes": self.seam_attributes.hex(),
            "td_attributes": self.td_attributes.hex(),
            "td_attributes_decoded": decode_td_attributes(self.td_attributes),
            "xfam": self.xfam.hex(),
            "mr_td": self.mr_td.hex(),
            "mr_config_id": self.mr_config_id.hex(),
            "mr_owner": self.mr_owner.hex(),
            "mr_owner_config": self.mr_owner_config.hex(),
            **{f"rtmr{i}": value.hex() for i, value in enumerate(self.rtmrs)},
            "report_data": self.report_data.hex(),
        }
        if self.tee_tcb_svn2 is not None and self.mr_servicetd is not None:
            out["tee_tcb_svn2"] = self.tee_tcb_svn2.hex()
            out["mr_servicetd"] = self.mr_servicetd.hex()
        return out


def _parse_body(data: bytes, base: int, *, tdx15: bool) -> TdQuoteBody:
    def take(span: _Span) -> bytes:
        return _take(data, span, base)

    return TdQuoteBody(
        tee_tcb_svn=take(_QB_TEE_TCB_SVN),
        mr_seam=take(_QB_MR_SEAM),
        mrsigner_seam=take(_QB_MRSIGNER_SEAM),
        seam_attributes=take(_QB_SEAM_ATTRIBUTES),
        td_attributes=take(_QB_TD_ATTRIBUTES),
        xfam=take(_QB_XFAM),
        mr_td=take(_QB_MR_TD),
        mr_config_id=take(_QB_MR_CONFIG_ID),
        mr_owner=take(_QB_MR_OWNER),
        mr_owner_config=take(_QB_MR_OWNER_CONFIG),
        rtmrs=_rtmrs(data, _QB_RTMR0, base),
        report_data=take(_QB_REPORT_DATA),
        tee_tcb_svn2=take(_QB_TEE_TCB_SVN2) if tdx15 else None,
        mr_servicetd=take(_QB_MR_SERVICETD) if tdx15 else None,
    )


_CERT_TYPES = tuple(int(t) for t in CertificationDataType)


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificationData:
    """Opaque certification data of any type except 6 (which is `QeReportCertificationData`)."""

    cert_type: int
    data: bytes

    def __post_init__(self) -> None:
        if self.cert_type not in _CERT_TYPES or self.cert_type == CertificationDataType.QE_REPORT:
            msg = f"`cert_type` is {self.cert_type}, expected 1..5 or 7 (type 6 is QeReportCertificationData)"
            raise ValueError(msg)
        _check_size("data", self.data, len(self.data))

    def to_bytes(self) -> bytes:
        return struct.pack("<HI", self.cert_type, len(self.data)) + self.data

    def pem_certificates(self) -> tuple[bytes, ...]:
        """For type 5 (PCK chain): the PEM certificates in order (leaf first), each ending in its END line."""
        if self.cert_type != CertificationDataType.PCK_CERT_CHAIN:
            msg = f"`cert_type` is {self.cert_type}, expected 5 (PCK certificate chain)"
            raise ValueError(msg)
        end = b"-----END CERTIFICATE-----"
        certs: list[bytes] = []
        rest = self.data
        while (i := rest.find(end)) >= 0:
            start = rest.find(b"-----BEGIN CERTIFICATE-----", 0, i)
            if start >= 0:
                certs.append(rest[start : i + len(end)] + b"\n")
            rest = rest[i + len(end) :]
        return tuple(certs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cert_type": self.cert_type, "size": len(self.data)}
        if self.cert_type == CertificationDataType.PCK_CERT_CHAIN:
            out["pem_certificates"] = len(self.pem_certificates())
        else:
            out["data"] = self.data.hex()
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class QeReportCertificationData:
    """Certification data type 6: the QE's SGX report, its PCK signature, QE auth data and nested cert data."""

    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    certification_data: CertificationData

    def __post_init__(self) -> None:
        _check_size("qe_report", self.qe_report, _QE_REPORT_LEN)
        _check_size("qe_report_signature", self.qe_report_signature, _QE_REPORT_SIG_LEN)
        _check_size("qe_auth_data", self.qe_auth_data, len(self.qe_auth_data))
        if len(self.qe_auth_data) > 0xFFFF:
            msg = f"`qe_auth_data` length is 0x{len(self.qe_auth_data):x}, expected at most 0xffff"
            raise ValueError(msg)

    cert_type = CertificationDataType.QE_REPORT

    @property
    def qe_report_data(self) -> bytes:
        """REPORTDATA of the QE report; its first 32 bytes are SHA-256(attestation key || qe_auth_data)."""
        return _take(self.qe_report, _QE_REPORT_DATA)

    def payload(self) -> bytes:
        return (
            self.qe_report
            + self.qe_report_signature
            + struct.pack("<H", len(self.qe_auth_data))
            + self.qe_auth_data
            + self.certification_data.to_bytes()
        )

    def to_bytes(self) -> bytes:
        body = self.payload()
        return struct.pack("<HI", CertificationDataType.QE_REPORT, len(body)) + body

    def to_dict(self) -> dict[str, Any]:
        return {
            "cert_type": int(CertificationDataType.QE_REPORT),
            "size": len(self.payload()),
            "qe_report": self.qe_report.hex(),
            "qe_report_signature": self.qe_report_signature.hex(),
            "qe_auth_data": self.qe_auth_data.hex(),
            "certification_data": self.certification_data.to_dict(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class QuoteSignatureData:
    """ECDSA-P256 quote signature data: signature, attestation key and certification data."""

    signature: bytes
    attestation_key: bytes
    certification: CertificationData | QeReportCertificationData

    def __post_init__(self) -> None:
        _check_size("signature", self.signature, _SIG_ECDSA.size)
        _check_size("attestation_key", self.attestation_key, _SIG_ATTEST_KEY.size)

    def to_bytes(self) -> bytes:
        return self.signature + self.attestation_key + self.certification.to_bytes()

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": self.signature.hex(),
            "attestation_key": self.attestation_key.hex(),
            "certification_data": self.certification.to_dict(),
        }


def _parse_cert_header(data: bytes, offset: int, end: int, what: str) -> tuple[int, int]:
    """Read a certification-data header at `offset` whose data must end exactly at `end`."""
    if end - offset < _CERT_HEADER_LEN:
        msg = f"{what} header length is 0x{max(end - offset, 0):x}, expected 0x{_CERT_HEADER_LEN:x}"
        raise _fail(msg, offset)
    cert_type = _u16(data, offset)
    size = _u32(data, offset + 2)
    if cert_type not in _CERT_TYPES:
        msg = f"{what} type is {cert_type}, expected 1..7"
        raise _fail(msg, offset)
    want = end - offset - _CERT_HEADER_LEN
    if size != want:
        msg = f"{what} size is 0x{size:x}, expected 0x{want:x} (the rest of the enclosing structure)"
        raise _fail(msg, offset + 2)
    return cert_type, size


def _parse_signature_data(data: bytes, start: int, end: int) -> QuoteSignatureData:
    min_len = _SIG_CERT_HEADER + _CERT_HEADER_LEN
    if end - start < min_len:
        msg = f"`signature_data_len` is 0x{end - start:x}, expected at least 0x{min_len:x}"
        raise _fail(msg, start - 4)
    cert_off = start + _SIG_CERT_HEADER
    cert_type, size = _parse_cert_header(data, cert_off, end, "`certification_data`")
    body = cert_off + _CERT_HEADER_LEN
    certification: CertificationData | QeReportCertificationData
    if cert_type == CertificationDataType.QE_REPORT:
        fixed = _QE_REPORT_LEN + _QE_REPORT_SIG_LEN + _QE_AUTH_SIZE_LEN
        if size < fixed:
            msg = f"QE report certification data length is 0x{size:x}, expected at least 0x{fixed:x}"
            raise _fail(msg, body)
        auth_off = body + _QE_REPORT_LEN + _QE_REPORT_SIG_LEN
        auth_len = _u16(data, auth_off)
        inner_off = auth_off + _QE_AUTH_SIZE_LEN + auth_len
        if inner_off > end:
            msg = f"`qe_auth_data` size is 0x{auth_len:x}, expected at most 0x{end - auth_off - 2:x}"
            raise _fail(msg, auth_off)
        inner_type, _ = _parse_cert_header(data, inner_off, end, "nested `certification_data`")
        if inner_type == CertificationDataType.QE_REPORT:
            msg = "nested `certification_data` type is 6, expected 1..5 or 7"
            raise _fail(msg, inner_off)
        certification = QeReportCertificationData(
            qe_report=data[body : body + _QE_REPORT_LEN],
            qe_report_signature=data[body + _QE_REPORT_LEN : auth_off],
            qe_auth_data=data[auth_off + _QE_AUTH_SIZE_LEN : inner_off],
            certification_data=CertificationData(cert_type=inner_type, data=data[inner_off + _CERT_HEADER_LEN : end]),
        )
    else:
        certification = CertificationData(cert_type=cert_type, data=data[body:end])
    return QuoteSignatureData(
        signature=_take(data, _SIG_ECDSA, start),
        attestation_key=_take(data, _SIG_ATTEST_KEY, start),
        certification=certification,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxQuote:
    """A TDX ECDSA quote v4 or v5 with any accepted trailing bytes (see the module docstring)."""

    header: QuoteHeader
    body: TdQuoteBody
    signature_data: QuoteSignatureData
    trailing: bytes = b""

    def __post_init__(self) -> None:
        if self.header.version == _QUOTE_V4 and self.body.is_tdx15:
            msg = "a version-4 quote carries a TDX 1.0 body; TDX 1.5 bodies need version 5"
            raise ValueError(msg)
        _check_size("trailing", self.trailing, len(self.trailing))

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def body_type(self) -> int:
        """The v5 body descriptor type: 2 (TDX 1.0 body) or 3 (TDX 1.5 body); v4 quotes always carry type 2."""
        return _Q5_BODY_TDX15 if self.body.is_tdx15 else _Q5_BODY_TDX10

    def signed_bytes(self) -> bytes:
        """The bytes covered by the attestation-key signature: header, (descriptor,) body."""
        head = self.header.to_bytes()
        body = self.body.to_bytes()
        if self.version == _QUOTE_V5:
            head += struct.pack("<HI", self.body_type, len(body))
        return head + body

    def quote_bytes(self) -> bytes:
        """The quote alone, without trailing bytes."""
        sig = self.signature_data.to_bytes()
        return self.signed_bytes() + struct.pack("<I", len(sig)) + sig

    def to_bytes(self) -> bytes:
        """The quote followed by the trailing bytes it was parsed with: `parse_quote(b, ...).to_bytes() == b`."""
        return self.quote_bytes() + self.trailing

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "tdx_quote", "header": self.header.to_dict()}
        if self.version == _QUOTE_V5:
            out["body_type"] = self.body_type
        out["body"] = self.body.to_dict()
        out["signature_data_len"] = len(self.signature_data.to_bytes())
        out["signature_data"] = self.signature_data.to_dict()
        out["quote_len"] = len(self.quote_bytes())
        out["trailing_len"] = len(self.trailing)
        return out


def _parse_header(data: bytes) -> QuoteHeader:
    if len(data) < _QH_LEN:
        msg = f"`quote` length is 0x{len(data):x}, expected at least 0x{_QH_LEN:x}"
        raise _fail(msg, 0)
    version = _u16(data, _QH_VERSION.start)
    if version not in (_QUOTE_V4, _QUOTE_V5):
        msg = f"quote `version` is {version}, expected 4 or 5"
        raise _fail(msg, _QH_VERSION.start)
    key_type = _u16(data, _QH_ATT_KEY_TYPE.start)
    if key_type != _ATT_KEY_ECDSA_P256:
        msg = f"`att_key_type` is {key_type}, expected {_ATT_KEY_ECDSA_P256} (ECDSA P-256)"
        raise _fail(msg, _QH_ATT_KEY_TYPE.start)
    tee_type = _u32(data, _QH_TEE_TYPE.start)
    if tee_type != _TEE_TYPE_TDX:
        msg = f"`tee_type` is 0x{tee_type:x}, expected 0x{_TEE_TYPE_TDX:x} (TDX)"
        raise _fail(msg, _QH_TEE_TYPE.start)
    _require_zero(data, _QH_RESERVED, "quote header reserved")
    return QuoteHeader(
        version=version,
        qe_vendor_id=_take(data, _QH_QE_VENDOR_ID),
        user_data=_take(data, _QH_USER_DATA),
    )


def parse_quote(data: bytes, *, trailing: Trailing = Trailing.ZEROS) -> TdxQuote:
    """Parse a TDX quote v4 or v5; bytes after the quote's own end are handled per `trailing`."""
    header = _parse_header(data)
    if header.version == _QUOTE_V4:
        body_start, body_len, tdx15 = _QH_LEN, _BODY10_LEN, False
    else:
        if len(data) < _QH_LEN + _Q5_DESC_LEN:
            msg = f"`quote` length is 0x{len(data):x}, expected at least 0x{_QH_LEN + _Q5_DESC_LEN:x}"
            raise _fail(msg, len(data))
        body_type = _u16(data, _QH_LEN)
        body_len = _u32(data, _QH_LEN + 2)
        if body_type == _Q5_BODY_TDX10:
            want_len, tdx15 = _BODY10_LEN, False
        elif body_type == _Q5_BODY_TDX15:
            want_len, tdx15 = _BODY15_LEN, True
        else:
            what = " (SGX report)" if body_type == _Q5_BODY_SGX else ""
            msg = f"quote body `type` is {body_type}{what}, expected 2 or 3"
            raise _fail(msg, _QH_LEN)
        if body_len != want_len:
            msg = f"quote body `size` is 0x{body_len:x}, expected 0x{want_len:x} for body type {body_type}"
            raise _fail(msg, _QH_LEN + 2)
        body_start = _QH_LEN + _Q5_DESC_LEN
    sig_len_off = body_start + body_len
    if len(data) < sig_len_off + 4:
        msg = f"`quote` length is 0x{len(data):x}, expected at least 0x{sig_len_off + 4:x}"
        raise _fail(msg, len(data))
    body = _parse_body(data, body_start, tdx15=tdx15)
    sig_len = _u32(data, sig_len_off)
    sig_start = sig_len_off + 4
    end = sig_start + sig_len
    if len(data) < end:
        msg = (
            f"`quote` length is 0x{len(data):x}, expected at least 0x{end:x} "
            f"(`signature_data_len` 0x{sig_len:x} at 0x{sig_len_off:x})"
        )
        raise _fail(msg, sig_len_off)
    signature_data = _parse_signature_data(data, sig_start, end)
    rest = data[end:]
    if rest and trailing is Trailing.REJECT:
        msg = f"trailing data length is 0x{len(rest):x}, expected 0x0 (quote ends at 0x{end:x})"
        raise _fail(msg, end)
    if trailing is Trailing.ZEROS and any(rest):
        at = end + next(i for i, b in enumerate(rest) if b)
        msg = f"trailing byte at 0x{at:x} is 0x{data[at]:02x}, expected 0x00 (quote ends at 0x{end:x})"
        raise _fail(msg, at)
    return TdxQuote(header=header, body=body, signature_data=signature_data, trailing=rest)
