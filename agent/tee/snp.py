"""AMD SEV-SNP evidence: the attestation report, the extended-report certificate table and the evidence JSON. Pure.

Layouts follow hw-abi.md §6.4-§6.5 (AMD SEV-SNP ABI spec, GHCB spec); integers are little-endian. Every parser has
a serialiser and `parse_x(b).to_bytes() == b` holds for every accepted input.

Strictness: the report must be exactly 0x4a0 bytes; versions 2-5 are accepted (4 is laid out like 3); the signature
algorithm must be 1 (ECDSA P-384/SHA-384); the signer-info word may only use its defined bits with a known signing
key; POLICY bit 17 (reserved, must be one) must be set; every reserved byte range must be zero (they are not stored;
the serialiser writes zeros back). TCB_VERSION values are stored as raw u64 and decoded on demand, because their byte
layout depends on the CPU generation, which v2 reports do not state (see `AttestationReport.tcb_layout`); their
reserved bytes must be zero in the layout the report implies (so a v2 report from a Turin part with a masked chip ID
would be rejected; Turin firmware emits v3+ reports). Only `EvidenceParseError` leaves a parser.

Evidence JSON (`snp_evidence`) is the serde form of the Rust `sev` crate's `AttestationReport` that Trustee's SNP
verifier deserialises (guest-api.md §5.2): byte arrays as lists of integers, nested TCB objects, `signature {r, s}`.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import EvidenceParseError
from agent.tee._layout import Span as _Span
from agent.tee._layout import check_int as _check_int
from agent.tee._layout import check_size as _check_size
from agent.tee._layout import require_zero as _require_zero
from agent.tee._layout import take as _take

__all__ = [
    "SNP_REPORT_LEN",
    "AttestationReport",
    "CertTable",
    "CertTableEntry",
    "CertType",
    "FirmwareVersion",
    "TcbLayout",
    "TcbVersion",
    "cert_table_from_sev_json",
    "decode_platform_info",
    "decode_policy",
    "decode_signer_info",
    "parse_cert_table",
    "parse_report",
    "report_from_sev_json",
    "snp_evidence",
]


# --- ATTESTATION_REPORT (1184 bytes), hw-abi.md §6.4 -------------------------------------------------------------
SNP_REPORT_LEN = 0x4A0
_R_VERSION = _Span(0x000, 4)
_R_GUEST_SVN = _Span(0x004, 4)
_R_POLICY = _Span(0x008, 8)
_R_FAMILY_ID = _Span(0x010, 16)
_R_IMAGE_ID = _Span(0x020, 16)
_R_VMPL = _Span(0x030, 4)
_R_SIG_ALGO = _Span(0x034, 4)
_R_CURRENT_TCB = _Span(0x038, 8)
_R_PLATFORM_INFO = _Span(0x040, 8)
_R_SIGNER_INFO = _Span(0x048, 4)
_R_RESERVED1 = _Span(0x04C, 4)
_R_REPORT_DATA = _Span(0x050, 64)
_R_MEASUREMENT = _Span(0x090, 48)
_R_HOST_DATA = _Span(0x0C0, 32)
_R_ID_KEY_DIGEST = _Span(0x0E0, 48)
_R_AUTHOR_KEY_DIGEST = _Span(0x110, 48)
_R_REPORT_ID = _Span(0x140, 32)
_R_REPORT_ID_MA = _Span(0x160, 32)
_R_REPORTED_TCB = _Span(0x180, 8)
_R_CPUID = _Span(0x188, 3)  # v3+: family, model, stepping; reserved (zero) in v2
_R_RESERVED2 = _Span(0x18B, 21)
_R_CHIP_ID = _Span(0x1A0, 64)
_R_COMMITTED_TCB = _Span(0x1E0, 8)
_R_CURRENT_VERSION = _Span(0x1E8, 3)  # build, minor, major
_R_RESERVED3 = _Span(0x1EB, 1)
_R_COMMITTED_VERSION = _Span(0x1EC, 3)
_R_RESERVED4 = _Span(0x1EF, 1)
_R_LAUNCH_TCB = _Span(0x1F0, 8)
_R_LAUNCH_MIT_VECTOR = _Span(0x1F8, 8)  # v5+
_R_CURRENT_MIT_VECTOR = _Span(0x200, 8)  # v5+
_R_RESERVED5_V5 = _Span(0x208, 0x98)
_R_RESERVED5_PRE_V5 = _Span(0x1F8, 0xA8)
_R_SIGNED = _Span(0x000, 0x2A0)
_R_SIG_R = _Span(0x2A0, 72)
_R_SIG_S = _Span(0x2E8, 72)
_R_SIG_RESERVED = _Span(0x330, 0x170)

_VERSIONS = (2, 3, 4, 5)
_CPUID_SINCE = 3
_MIT_VECTOR_SINCE = 5
_SIG_ALGO_ECDSA_P384_SHA384 = 1
_TURIN_FAMILY = 0x1A

# signer info (u32 @0x48)
_SIGNER_AUTHOR_KEY_EN = 1 << 0
_SIGNER_MASK_CHIP_KEY = 1 << 1
_SIGNER_KEY_SHIFT = 2
_SIGNER_KEY_MASK = 0x7
_SIGNER_DEFINED_BITS = 0x1F
_SIGNING_KEYS = {0: "VCEK", 1: "VLEK", 7: "NONE"}

# POLICY (u64 @0x08)
_POLICY_RESERVED_ONE = 1 << 17
_POLICY_BITS = {
    "smt": 16,
    "migrate_ma": 18,
    "debug": 19,
    "single_socket": 20,
    "cxl_allow": 21,
    "mem_aes_256_xts": 22,
    "rapl_dis": 23,
    "ciphertext_hiding": 24,
    "page_swap_disable": 25,
}
_POLICY_KNOWN_MASK = 0xFFFF | _POLICY_RESERVED_ONE | sum(1 << b for b in _POLICY_BITS.values())

# PLATFORM_INFO (u64 @0x40)
_PLATFORM_BITS = {
    "smt_en": 0,
    "tsme_en": 1,
    "ecc_en": 2,
    "rapl_dis": 3,
    "ciphertext_hiding_en": 4,
    "alias_check_complete": 5,
    "tio_en": 7,
}
_PLATFORM_KNOWN_MASK = sum(1 << b for b in _PLATFORM_BITS.values())

_U8 = 0xFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


# --- helpers -----------------------------------------------------------------------------------------------------


def _int(data: bytes, span: _Span) -> int:
    return int.from_bytes(_take(data, span), "little")


def _bits(value: int, table: Mapping[str, int]) -> dict[str, bool]:
    return {name: bool(value >> bit & 1) for name, bit in table.items()}


def decode_policy(policy: int) -> dict[str, Any]:
    """Decode the guest POLICY word (hw-abi.md §6.4); `unknown_bits` are set bits this version does not name."""
    out: dict[str, Any] = {"abi_minor": policy & 0xFF, "abi_major": policy >> 8 & 0xFF}
    out.update(_bits(policy, _POLICY_BITS))
    out["reserved_bit17_set"] = bool(policy & _POLICY_RESERVED_ONE)
    out["unknown_bits"] = f"0x{policy & ~_POLICY_KNOWN_MASK & _U64:x}"
    return out


def decode_platform_info(platform_info: int) -> dict[str, Any]:
    """Decode the PLATFORM_INFO word (hw-abi.md §6.4)."""
    out: dict[str, Any] = dict(_bits(platform_info, _PLATFORM_BITS))
    out["unknown_bits"] = f"0x{platform_info & ~_PLATFORM_KNOWN_MASK & _U64:x}"
    return out


def decode_signer_info(signer_info: int) -> dict[str, Any]:
    """Decode the signer-info word at 0x48: AUTHOR_KEY_EN, MASK_CHIP_KEY and SIGNING_KEY."""
    key = signer_info >> _SIGNER_KEY_SHIFT & _SIGNER_KEY_MASK
    return {
        "author_key_en": bool(signer_info & _SIGNER_AUTHOR_KEY_EN),
        "mask_chip_key": bool(signer_info & _SIGNER_MASK_CHIP_KEY),
        "signing_key": _SIGNING_KEYS.get(key, f"reserved({key})"),
    }


# --- TCB_VERSION and firmware versions ---------------------------------------------------------------------------


class TcbLayout(enum.Enum):
    """Byte layout of a TCB_VERSION u64, which depends on the CPU generation (hw-abi.md §6.4)."""

    PRE_TURIN = "pre_turin"  # Milan, Genoa: 0 BOOT_LOADER, 1 TEE, 2-5 reserved, 6 SNP, 7 MICROCODE
    TURIN = "turin"  # 0 FMC, 1 BOOT_LOADER, 2 TEE, 3 SNP, 4-6 reserved, 7 MICROCODE


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbVersion:
    """A decoded TCB_VERSION; `fmc` is set exactly for the Turin layout."""

    fmc: int | None
    bootloader: int
    tee: int
    snp: int
    microcode: int

    def __post_init__(self) -> None:
        if self.fmc is not None:
            _check_int("fmc", self.fmc, _U8)
        for name in ("bootloader", "tee", "snp", "microcode"):
            _check_int(name, getattr(self, name), _U8)

    @property
    def layout(self) -> TcbLayout:
        return TcbLayout.PRE_TURIN if self.fmc is None else TcbLayout.TURIN

    @classmethod
    def decode(cls, raw: int, layout: TcbLayout) -> TcbVersion:
        """Decode a raw TCB_VERSION (the u64 as read little-endian). Reserved bytes are ignored here."""
        b = raw.to_bytes(8, "little")
        if layout is TcbLayout.TURIN:
            return cls(fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
        return cls(fmc=None, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def encode(self) -> int:
        """The raw u64 for this value in its own layout, reserved bytes zero."""
        if self.fmc is not None:
            b = bytes((self.fmc, self.bootloader, self.tee, self.snp, 0, 0, 0, self.microcode))
        else:
            b = bytes((self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode))
        return int.from_bytes(b, "little")

    def to_sev_json(self) -> dict[str, int | None]:
        return {
            "fmc": self.fmc,
            "bootloader": self.bootloader,
            "tee": self.tee,
            "snp": self.snp,
            "microcode": self.microcode,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class FirmwareVersion:
    """A firmware version stored as the bytes build, minor, major."""

    major: int
    minor: int
    build: int

    def __post_init__(self) -> None:
        for name in ("major", "minor", "build"):
            _check_int(name, getattr(self, name), _U8)

    @classmethod
    def from_bytes(cls, raw: bytes) -> FirmwareVersion:
        build, minor, major = raw
        return cls(major=major, minor=minor, build=build)

    def to_bytes(self) -> bytes:
        return bytes((self.build, self.minor, self.major))

    def to_sev_json(self) -> dict[str, int]:
        return {"major": self.major, "minor": self.minor, "build": self.build}

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


# --- attestation report ------------------------------------------------------------------------------------------

_BYTE_FIELDS: dict[str, _Span] = {
    "family_id": _R_FAMILY_ID,
    "image_id": _R_IMAGE_ID,
    "report_data": _R_REPORT_DATA,
    "measurement": _R_MEASUREMENT,
    "host_data": _R_HOST_DATA,
    "id_key_digest": _R_ID_KEY_DIGEST,
    "author_key_digest": _R_AUTHOR_KEY_DIGEST,
    "report_id": _R_REPORT_ID,
    "report_id_ma": _R_REPORT_ID_MA,
    "chip_id": _R_CHIP_ID,
    "signature_r": _R_SIG_R,
    "signature_s": _R_SIG_S,
}
_TCB_FIELDS: dict[str, _Span] = {
    "current_tcb": _R_CURRENT_TCB,
    "reported_tcb": _R_REPORTED_TCB,
    "committed_tcb": _R_COMMITTED_TCB,
    "launch_tcb": _R_LAUNCH_TCB,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AttestationReport:
    """An SEV-SNP ATTESTATION_REPORT (version 2-5).

    `cpuid` (family, model, stepping) is present exactly from version 3, the mitigation vectors exactly from
    version 5. TCB fields are raw u64 values; use `tcb()` for the decoded form.
    """

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    sig_algo: int
    current_tcb: int
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid: tuple[int, int, int] | None
    chip_id: bytes
    committed_tcb: int
    current_version: FirmwareVersion
    committed_version: FirmwareVersion
    launch_tcb: int
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: bytes
    signature_s: bytes

    def __post_init__(self) -> None:
        if self.version not in _VERSIONS:
            msg = f"`version` is {self.version}, expected one of {_VERSIONS}"
            raise ValueError(msg)
        for name in ("guest_svn", "vmpl", "sig_algo", "signer_info"):
            _check_int(name, getattr(self, name), _U32)
        for name in ("policy", "platform_info", *_TCB_FIELDS):
            _check_int(name, getattr(self, name), _U64)
        for name, span in _BYTE_FIELDS.items():
            _check_size(name, getattr(self, name), span.size)
        if (self.cpuid is not None) != (self.version >= _CPUID_SINCE):
            msg = f"`cpuid` must be set exactly for report versions >= 3 (version is {self.version})"
            raise ValueError(msg)
        if self.cpuid is not None:
            if len(self.cpuid) != _R_CPUID.size:
                msg = f"`cpuid` has {len(self.cpuid)} items, expected 3"
                raise ValueError(msg)
            for i, value in enumerate(self.cpuid):
                _check_int(f"cpuid[{i}]", value, _U8)
        mit = (self.launch_mit_vector, self.current_mit_vector)
        has_mit = self.version >= _MIT_VECTOR_SINCE
        for name, mit_value in zip(("launch_mit_vector", "current_mit_vector"), mit, strict=True):
            if (mit_value is not None) != has_mit:
                msg = f"`{name}` must be set exactly for report versions >= 5 (version is {self.version})"
                raise ValueError(msg)
            if mit_value is not None:
                _check_int(name, mit_value, _U64)

    # -- decoded views --

    @property
    def tcb_layout(self) -> TcbLayout:
        """TCB layout: from the CPUID family for v3+ (0x1A = Turin); for v2 guessed as virtee/sev does.

        A v2 report whose CHIP_ID has only its first 8 bytes set is taken as Turin; a masked (all-zero) CHIP_ID
        cannot be told apart and is taken as pre-Turin.
        """
        if self.cpuid is not None:
            return TcbLayout.TURIN if self.cpuid[0] >= _TURIN_FAMILY else TcbLayout.PRE_TURIN
        if any(self.chip_id) and not any(self.chip_id[8:]):
            return TcbLayout.TURIN
        return TcbLayout.PRE_TURIN

    def tcb(self, raw: int) -> TcbVersion:
        """Decode one of this report's TCB fields, e.g. `report.tcb(report.reported_tcb)`."""
        return TcbVersion.decode(raw, self.tcb_layout)

    @property
    def signing_key(self) -> str:
        return str(decode_signer_info(self.signer_info)["signing_key"])

    # -- serialisation --

    def signed_bytes(self) -> bytes:
        """Bytes 0x000-0x29f, the region the VCEK/VLEK signature covers."""
        return self.to_bytes()[: _R_SIGNED.end]

    def to_bytes(self) -> bytes:
        out = bytearray(SNP_REPORT_LEN)

        def put(span: _Span, value: bytes) -> None:
            out[span.start : span.end] = value

        def put_int(span: _Span, value: int) -> None:
            put(span, value.to_bytes(span.size, "little"))

        put_int(_R_VERSION, self.version)
        put_int(_R_GUEST_SVN, self.guest_svn)
        put_int(_R_POLICY, self.policy)
        put_int(_R_VMPL, self.vmpl)
        put_int(_R_SIG_ALGO, self.sig_algo)
        put_int(_R_PLATFORM_INFO, self.platform_info)
        put_int(_R_SIGNER_INFO, self.signer_info)
        for name, span in _TCB_FIELDS.items():
            put_int(span, getattr(self, name))
        for name, span in _BYTE_FIELDS.items():
            put(span, getattr(self, name))
        if self.cpuid is not None:
            put(_R_CPUID, bytes(self.cpuid))
        put(_R_CURRENT_VERSION, self.current_version.to_bytes())
        put(_R_COMMITTED_VERSION, self.committed_version.to_bytes())
        if self.launch_mit_vector is not None and self.current_mit_vector is not None:
            put_int(_R_LAUNCH_MIT_VECTOR, self.launch_mit_vector)
            put_int(_R_CURRENT_MIT_VECTOR, self.current_mit_vector)
        return bytes(out)

    def to_sev_json(self) -> dict[str, Any]:
        """The `sev` crate serde form Trustee's verifier parses (key order as in guest-api.md §5.2).

        `cpuid_*` are null before version 3 (as serde writes `None`); the mitigation-vector keys are written only
        from version 5 on, matching Trustee's reference evidence for a v3 report (serde reads absent as `None`).
        """
        cpuid: tuple[int | None, int | None, int | None] = self.cpuid or (None, None, None)
        out: dict[str, Any] = {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": self.policy,
            "family_id": list(self.family_id),
            "image_id": list(self.image_id),
            "vmpl": self.vmpl,
            "sig_algo": self.sig_algo,
            "current_tcb": self.tcb(self.current_tcb).to_sev_json(),
            "plat_info": self.platform_info,
            "key_info": self.signer_info,
            "report_data": list(self.report_data),
            "measurement": list(self.measurement),
            "host_data": list(self.host_data),
            "id_key_digest": list(self.id_key_digest),
            "author_key_digest": list(self.author_key_digest),
            "report_id": list(self.report_id),
            "report_id_ma": list(self.report_id_ma),
            "reported_tcb": self.tcb(self.reported_tcb).to_sev_json(),
            "cpuid_fam_id": cpuid[0],
            "cpuid_mod_id": cpuid[1],
            "cpuid_step": cpuid[2],
            "chip_id": list(self.chip_id),
            "committed_tcb": self.tcb(self.committed_tcb).to_sev_json(),
            "current": self.current_version.to_sev_json(),
            "committed": self.committed_version.to_sev_json(),
            "launch_tcb": self.tcb(self.launch_tcb).to_sev_json(),
        }
        if self.launch_mit_vector is not None:
            out["launch_mit_vector"] = self.launch_mit_vector
            out["current_mit_vector"] = self.current_mit_vector
        out["signature"] = {"r": list(self.signature_r), "s": list(self.signature_s)}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Decoded fields for people (hex strings for byte fields, decoded bit fields and TCBs)."""

        def tcb(raw: int) -> dict[str, Any]:
            decoded = self.tcb(raw)
            return {"raw": f"{raw:016x}", **decoded.to_sev_json()}

        out: dict[str, Any] = {
            "kind": "snp_report",
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": f"0x{self.policy:x}",
            "policy_decoded": decode_policy(self.policy),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "sig_algo": self.sig_algo,
            "tcb_layout": self.tcb_layout.value,
            "current_tcb": tcb(self.current_tcb),
            "platform_info": f"0x{self.platform_info:x}",
            "platform_info_decoded": decode_platform_info(self.platform_info),
            "signer_info": f"0x{self.signer_info:x}",
            "signer_info_decoded": decode_signer_info(self.signer_info),
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": tcb(self.reported_tcb),
            "cpuid": None
            if self.cpuid is None
            else {
                "family": self.cpuid[0],
                "model": self.cpuid[1],
                "stepping": self.cpuid[2],
            },
            "chip_id": self.chip_id.hex(),
            "committed_tcb": tcb(self.committed_tcb),
            "current_version": str(self.current_version),
            "committed_version": str(self.committed_version),
            "launch_tcb": tcb(self.launch_tcb),
            "launch_mit_vector": None if self.launch_mit_vector is None else f"0x{self.launch_mit_vector:x}",
            "current_mit_vector": None if self.current_mit_vector is None else f"0x{self.current_mit_vector:x}",
            "signature": {"r": self.signature_r.hex(), "s": self.signature_s.hex()},
        }
        return out


def _check_words(sig_algo: int, signer_info: int, policy: int) -> None:
    if sig_algo != _SIG_ALGO_ECDSA_P384_SHA384:
        msg = f"`SIGNATURE_ALGO` is {sig_algo}, expected 1 (ECDSA P-384 with SHA-384)"
        raise EvidenceParseError(msg, offset=_R_SIG_ALGO.start)
    if signer_info & ~_SIGNER_DEFINED_BITS:
        msg = f"signer info reserved bits are 0x{signer_info & ~_SIGNER_DEFINED_BITS:x}, expected 0x0"
        raise EvidenceParseError(msg, offset=_R_SIGNER_INFO.start)
    key = signer_info >> _SIGNER_KEY_SHIFT & _SIGNER_KEY_MASK
    if key not in _SIGNING_KEYS:
        msg = f"`SIGNING_KEY` is {key}, expected 0 (VCEK), 1 (VLEK) or 7 (none)"
        raise EvidenceParseError(msg, offset=_R_SIGNER_INFO.start)
    if not policy & _POLICY_RESERVED_ONE:
        msg = f"`POLICY` bit 17 is 0, expected 1 (reserved, must be one; policy 0x{policy:x})"
        raise EvidenceParseError(msg, offset=_R_POLICY.start + 2)


def parse_report(data: bytes) -> AttestationReport:
    """Parse a bare 1184-byte attestation report (configfs `outblob`, or ioctl response bytes 0x20..0x4c0)."""
    if len(data) != SNP_REPORT_LEN:
        msg = f"SNP report length is 0x{len(data):x}, expected 0x{SNP_REPORT_LEN:x}"
        raise EvidenceParseError(msg, offset=0)
    version = _int(data, _R_VERSION)
    if version not in _VERSIONS:
        msg = f"SNP report `VERSION` is {version}, expected 2, 3, 4 or 5"
        raise EvidenceParseError(msg, offset=0)
    sig_algo = _int(data, _R_SIG_ALGO)
    signer_info = _int(data, _R_SIGNER_INFO)
    policy = _int(data, _R_POLICY)
    _check_words(sig_algo, signer_info, policy)
    _require_zero(data, _R_RESERVED1, "SNP report reserved")
    if version < _CPUID_SINCE:
        _require_zero(data, _Span(_R_CPUID.start, _R_CPUID.size + _R_RESERVED2.size), "SNP report reserved")
    else:
        _require_zero(data, _R_RESERVED2, "SNP report reserved")
    _require_zero(data, _R_RESERVED3, "SNP report reserved")
    _require_zero(data, _R_RESERVED4, "SNP report reserved")
    if version < _MIT_VECTOR_SINCE:
        _require_zero(data, _R_RESERVED5_PRE_V5, "SNP report reserved")
    else:
        _require_zero(data, _R_RESERVED5_V5, "SNP report reserved")
    _require_zero(data, _R_SIG_RESERVED, "SNP signature reserved")
    cpuid_bytes = _take(data, _R_CPUID)
    has_mit = version >= _MIT_VECTOR_SINCE
    report = AttestationReport(
        version=version,
        guest_svn=_int(data, _R_GUEST_SVN),
        policy=policy,
        vmpl=_int(data, _R_VMPL),
        sig_algo=sig_algo,
        platform_info=_int(data, _R_PLATFORM_INFO),
        signer_info=signer_info,
        cpuid=(cpuid_bytes[0], cpuid_bytes[1], cpuid_bytes[2]) if version >= _CPUID_SINCE else None,
        current_version=FirmwareVersion.from_bytes(_take(data, _R_CURRENT_VERSION)),
        committed_version=FirmwareVersion.from_bytes(_take(data, _R_COMMITTED_VERSION)),
        launch_mit_vector=_int(data, _R_LAUNCH_MIT_VECTOR) if has_mit else None,
        current_mit_vector=_int(data, _R_CURRENT_MIT_VECTOR) if has_mit else None,
        current_tcb=_int(data, _R_CURRENT_TCB),
        reported_tcb=_int(data, _R_REPORTED_TCB),
        committed_tcb=_int(data, _R_COMMITTED_TCB),
        launch_tcb=_int(data, _R_LAUNCH_TCB),
        family_id=_take(data, _R_FAMILY_ID),
        image_id=_take(data, _R_IMAGE_ID),
        report_data=_take(data, _R_REPORT_DATA),
        measurement=_take(data, _R_MEASUREMENT),
        host_data=_take(data, _R_HOST_DATA),
        id_key_digest=_take(data, _R_ID_KEY_DIGEST),
        author_key_digest=_take(data, _R_AUTHOR_KEY_DIGEST),
        report_id=_take(data, _R_REPORT_ID),
        report_id_ma=_take(data, _R_REPORT_ID_MA),
        chip_id=_take(data, _R_CHIP_ID),
        signature_r=_take(data, _R_SIG_R),
        signature_s=_take(data, _R_SIG_S),
    )
    for name, span in _TCB_FIELDS.items():
        raw = getattr(report, name)
        canonical = report.tcb(raw).encode()
        if raw != canonical:
            got, want = raw.to_bytes(8, "little"), canonical.to_bytes(8, "little")
            i = next(i for i in range(8) if got[i] != want[i])
            at = span.start + i
            msg = (
                f"`{name.upper()}` reserved byte at 0x{at:x} is 0x{got[i]:02x}, expected 0x00 "
                f"({report.tcb_layout.value} TCB layout)"
            )
            raise EvidenceParseError(msg, offset=at)
    return report


# --- sev-crate JSON back into a report ---------------------------------------------------------------------------


def _json_int(obj: Mapping[str, Any], key: str, maximum: int, *, optional: bool = False) -> int | None:
    if key not in obj or obj[key] is None:
        if optional:
            return None
        msg = f"`{key}` is missing, expected an integer"
        raise EvidenceParseError(msg)
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        msg = f"`{key}` is {value!r}, expected an integer 0..0x{maximum:x}"
        raise EvidenceParseError(msg)
    return value


def _req_int(obj: Mapping[str, Any], key: str, maximum: int) -> int:
    value = _json_int(obj, key, maximum)
    assert value is not None  # _json_int raises for a missing required key
    return value


def _json_bytes(obj: Mapping[str, Any], key: str, size: int) -> bytes:
    value = obj.get(key)
    if (
        not isinstance(value, list)
        or len(value) != size
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U8 for v in value)
    ):
        got = f"a list of {len(value)} items" if isinstance(value, list) else repr(value)[:40]
        msg = f"`{key}` is {got}, expected a list of 0x{size:x} byte values"
        raise EvidenceParseError(msg)
    return bytes(value)


def _json_obj(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if not isinstance(value, Mapping):
        msg = f"`{key}` is {value!r}, expected an object"
        raise EvidenceParseError(msg)
    return value


def _json_tcb(obj: Mapping[str, Any], key: str) -> TcbVersion:
    tcb = _json_obj(obj, key)
    return TcbVersion(
        fmc=_json_int(tcb, "fmc", _U8, optional=True),
        bootloader=_req_int(tcb, "bootloader", _U8),
        tee=_req_int(tcb, "tee", _U8),
        snp=_req_int(tcb, "snp", _U8),
        microcode=_req_int(tcb, "microcode", _U8),
    )


def _json_version(obj: Mapping[str, Any], key: str) -> FirmwareVersion:
    ver = _json_obj(obj, key)
    return FirmwareVersion(
        major=_req_int(ver, "major", _U8), minor=_req_int(ver, "minor", _U8), build=_req_int(ver, "build", _U8)
    )


def report_from_sev_json(obj: object) -> AttestationReport:
    """Rebuild a report from its `sev`-crate JSON form (the inverse of `AttestationReport.to_sev_json`).

    The JSON carries no reserved bytes, so `report_from_sev_json(r.to_sev_json()) == r` for every parsed report;
    the TCB objects must agree with the layout the report implies (`fmc` set exactly for Turin).
    """
    if not isinstance(obj, Mapping):
        msg = f"`attestation_report` is {type(obj).__name__}, expected an object"
        raise EvidenceParseError(msg)
    version = _req_int(obj, "version", _U32)
    if version not in _VERSIONS:
        msg = f"`version` is {version}, expected 2, 3, 4 or 5"
        raise EvidenceParseError(msg)
    fam, mod, step = (_json_int(obj, k, _U8, optional=True) for k in ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step"))
    cpuid: tuple[int, int, int] | None = None
    if version >= _CPUID_SINCE:
        if fam is None or mod is None or step is None:
            msg = f"`cpuid_*` is null, expected integers for report version {version}"
            raise EvidenceParseError(msg)
        cpuid = (fam, mod, step)
    elif fam is not None or mod is not None or step is not None:
        msg = f"`cpuid_*` is set, expected null for report version {version}"
        raise EvidenceParseError(msg)
    launch_mit = _json_int(obj, "launch_mit_vector", _U64, optional=True)
    current_mit = _json_int(obj, "current_mit_vector", _U64, optional=True)
    if version >= _MIT_VECTOR_SINCE and (launch_mit is None or current_mit is None):
        msg = f"`launch_mit_vector`/`current_mit_vector` is null, expected integers for version {version}"
        raise EvidenceParseError(msg)
    if version < _MIT_VECTOR_SINCE and (launch_mit is not None or current_mit is not None):
        msg = f"`launch_mit_vector`/`current_mit_vector` is set, expected null for version {version}"
        raise EvidenceParseError(msg)
    sig = _json_obj(obj, "signature")
    tcbs = {name: _json_tcb(obj, name) for name in _TCB_FIELDS}
    sig_algo = _req_int(obj, "sig_algo", _U32)
    signer_info = _req_int(obj, "key_info", _U32)
    policy = _req_int(obj, "policy", _U64)
    _check_words(sig_algo, signer_info, policy)
    blobs = {
        name: _json_bytes(obj, name, span.size)
        for name, span in _BYTE_FIELDS.items()
        if not name.startswith("signature_")
    }
    try:
        report = AttestationReport(
            version=version,
            guest_svn=_req_int(obj, "guest_svn", _U32),
            policy=policy,
            family_id=blobs["family_id"],
            image_id=blobs["image_id"],
            vmpl=_req_int(obj, "vmpl", _U32),
            sig_algo=sig_algo,
            current_tcb=tcbs["current_tcb"].encode(),
            platform_info=_req_int(obj, "plat_info", _U64),
            signer_info=signer_info,
            report_data=blobs["report_data"],
            measurement=blobs["measurement"],
            host_data=blobs["host_data"],
            id_key_digest=blobs["id_key_digest"],
            author_key_digest=blobs["author_key_digest"],
            report_id=blobs["report_id"],
            report_id_ma=blobs["report_id_ma"],
            reported_tcb=tcbs["reported_tcb"].encode(),
            cpuid=cpuid,
            chip_id=blobs["chip_id"],
            committed_tcb=tcbs["committed_tcb"].encode(),
            current_version=_json_version(obj, "current"),
            committed_version=_json_version(obj, "committed"),
            launch_tcb=tcbs["launch_tcb"].encode(),
            launch_mit_vector=launch_mit,
            current_mit_vector=current_mit,
            signature_r=_json_bytes(sig, "r", _R_SIG_R.size),
            signature_s=_json_bytes(sig, "s", _R_SIG_S.size),
        )
    except ValueError as exc:
        raise EvidenceParseError(str(exc)) from exc
    for name, tcb in tcbs.items():
        if report.tcb(getattr(report, name)) != tcb:
            msg = f"`{name}` has layout {tcb.layout.value}, expected {report.tcb_layout.value} for this report"
            raise EvidenceParseError(msg)
    return report


# --- certificate table (GHCB extended report), hw-abi.md §6.5 ----------------------------------------------------

_CT_ENTRY_LEN = 24
_CT_GUID = _Span(0, 16)  # RFC 4122 byte order
_CT_OFFSET = _Span(16, 4)  # from the start of the table
_CT_LENGTH = _Span(20, 4)


class CertType(enum.Enum):
    """Certificate kinds named by the AMD GUIDs; anything else is OTHER."""

    VCEK = "63da758d-e664-4564-adc5-f4b93be8accd"
    VLEK = "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
    ASK = "4ab7b379-bbac-4fe4-a02f-05aef327c782"  # also the ASVK that signs VLEKs
    ARK = "c0b406a4-a803-4952-9743-3fb6014cd0ae"
    CRL = "92f81bc3-5811-4d3d-97ff-d19f88dc67ea"  # virtee/sev `CertType::CRL`
    OTHER = "other"

    @property
    def guid(self) -> uuid.UUID:
        if self is CertType.OTHER:
            msg = "CertType.OTHER has no fixed GUID"
            raise ValueError(msg)
        return uuid.UUID(self.value)

    @classmethod
    def of(cls, guid: uuid.UUID) -> CertType:
        for member in cls:
            if member is not cls.OTHER and member.value == str(guid):
                return member
        return cls.OTHER


@dataclass(frozen=True, slots=True, kw_only=True)
class CertTableEntry:
    """One certificate of the table: its GUID, its offset from the table start, and its (DER) bytes."""

    guid: uuid.UUID
    offset: int
    data: bytes

    def __post_init__(self) -> None:
        if self.guid.int == 0:
            msg = "`guid` must be a non-nil uuid.UUID"
            raise ValueError(msg)
        _check_int("offset", self.offset, _U32)
        _check_size("data", self.data, len(self.data))
        if not self.data:
            msg = "`data` length is 0x0, expected non-zero"
            raise ValueError(msg)
        if len(self.data) > _U32:
            msg = f"`data` length is 0x{len(self.data):x}, expected at most 0x{_U32:x}"
            raise ValueError(msg)

    @property
    def cert_type(self) -> CertType:
        return CertType.of(self.guid)

    def sev_cert_type(self) -> str | dict[str, str]:
        """The `sev` crate serde form of the type: `"VCEK"` etc., or `{"OTHER": "<uuid>"}`."""
        kind = self.cert_type
        return {"OTHER": str(self.guid)} if kind is CertType.OTHER else kind.name

    def to_sev_json(self) -> dict[str, Any]:
        return {"cert_type": self.sev_cert_type(), "data": list(self.data)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CertTable:
    """A GHCB certificate table: entries, a zero terminator, certificates; `size` is the whole buffer length.

    Bytes outside the entry headers and the certificates are zero (ioctl buffers are zero-filled to a multiple of
    4 KiB; the configfs `auxblob` is trimmed to the last certificate's end).
    """

    entries: tuple[CertTableEntry, ...]
    size: int

    def __post_init__(self) -> None:
        _check_int("size", self.size, _U32)
        header_end = _CT_ENTRY_LEN * (len(self.entries) + 1)
        if self.size < header_end:
            msg = f"`size` is 0x{self.size:x}, expected at least 0x{header_end:x} for the entry headers"
            raise ValueError(msg)
        previous_end = header_end
        for entry in sorted(self.entries, key=lambda e: e.offset):
            if entry.offset < previous_end:
                msg = f"certificate `offset` 0x{entry.offset:x} overlaps bytes before 0x{previous_end:x}"
                raise ValueError(msg)
            previous_end = entry.offset + len(entry.data)
        if previous_end > self.size:
            msg = f"certificates end at 0x{previous_end:x}, expected at most `size` 0x{self.size:x}"
            raise ValueError(msg)

    @classmethod
    def build(cls, certs: Sequence[tuple[uuid.UUID | CertType, bytes]]) -> CertTable:
        """Lay certificates out in order right after the terminator (the kernel / virtee layout)."""
        offset = _CT_ENTRY_LEN * (len(certs) + 1)
        entries = []
        for kind, data in certs:
            guid = kind.guid if isinstance(kind, CertType) else kind
            entries.append(CertTableEntry(guid=guid, offset=offset, data=data))
            offset += len(data)
        return cls(entries=tuple(entries), size=offset)

    def get(self, kind: CertType) -> bytes | None:
        """The first certificate of `kind`, if any."""
        return next((e.data for e in self.entries if e.cert_type is kind), None)

    def to_bytes(self) -> bytes:
        out = bytearray(self.size)
        for i, entry in enumerate(self.entries):
            base = i * _CT_ENTRY_LEN
            out[base : base + _CT_ENTRY_LEN] = entry.guid.bytes + struct.pack("<II", entry.offset, len(entry.data))
            out[entry.offset : entry.offset + len(entry.data)] = entry.data
        return bytes(out)

    def to_sev_json(self) -> list[dict[str, Any]]:
        return [entry.to_sev_json() for entry in self.entries]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "snp_cert_table",
            "size": self.size,
            "entries": [
                {
                    "guid": str(e.guid),
                    "cert_type": e.cert_type.name,
                    "offset": e.offset,
                    "length": len(e.data),
                }
                for e in self.entries
            ],
        }


def parse_cert_table(data: bytes) -> CertTable:
    """Parse a certificate table (ioctl `certs_address` buffer or configfs `auxblob`)."""
    entries: list[CertTableEntry] = []
    pos = 0
    while True:
        if len(data) < pos + _CT_ENTRY_LEN:
            msg = (
                f"certificate table length is 0x{len(data):x}, expected at least 0x{pos + _CT_ENTRY_LEN:x} "
                "(no all-zero terminator entry)"
            )
            raise EvidenceParseError(msg, offset=pos)
        raw = data[pos : pos + _CT_ENTRY_LEN]
        guid = uuid.UUID(bytes=_take(raw, _CT_GUID))
        offset = int.from_bytes(_take(raw, _CT_OFFSET), "little")
        length = int.from_bytes(_take(raw, _CT_LENGTH), "little")
        if guid.int == 0:
            if offset or length:
                msg = f"terminator entry at 0x{pos:x} offset/length is 0x{offset:x}/0x{length:x}, expected 0x0/0x0"
                raise EvidenceParseError(msg, offset=pos)
            break
        entries.append(_entry(data, guid, offset, length, pos))
        pos += _CT_ENTRY_LEN
    header_end = pos + _CT_ENTRY_LEN
    for entry in entries:
        if entry.offset < header_end:
            msg = f"certificate `offset` is 0x{entry.offset:x}, expected at least 0x{header_end:x}"
            raise EvidenceParseError(msg, offset=entries.index(entry) * _CT_ENTRY_LEN + _CT_OFFSET.start)
    try:
        table = CertTable(entries=tuple(entries), size=len(data))
    except ValueError as exc:
        raise EvidenceParseError(str(exc)) from exc
    rebuilt = table.to_bytes()
    if rebuilt != data:
        at = next(i for i, (a, b) in enumerate(zip(rebuilt, data, strict=True)) if a != b)
        msg = f"certificate table byte at 0x{at:x} is 0x{data[at]:02x}, expected 0x00 (outside any certificate)"
        raise EvidenceParseError(msg, offset=at)
    return table


def _entry(data: bytes, guid: uuid.UUID, offset: int, length: int, pos: int) -> CertTableEntry:
    if length == 0:
        msg = f"certificate `length` of {guid} is 0x0, expected non-zero"
        raise EvidenceParseError(msg, offset=pos + _CT_LENGTH.start)
    if offset + length > len(data):
        msg = f"certificate {guid} ends at 0x{offset + length:x}, expected at most 0x{len(data):x} (the table length)"
        raise EvidenceParseError(msg, offset=pos + _CT_OFFSET.start)
    return CertTableEntry(guid=guid, offset=offset, data=data[offset : offset + length])


def cert_table_from_sev_json(chain: object) -> CertTable:
    """Rebuild a (canonically laid out) table from the evidence `cert_chain` list."""
    if isinstance(chain, str | bytes) or not isinstance(chain, list | tuple):
        msg = f"`cert_chain` is {type(chain).__name__}, expected a list"
        raise EvidenceParseError(msg)
    certs: list[tuple[uuid.UUID | CertType, bytes]] = []
    for i, item in enumerate(chain):
        if not isinstance(item, Mapping):
            msg = f"`cert_chain[{i}]` is {type(item).__name__}, expected an object"
            raise EvidenceParseError(msg)
        kind = item.get("cert_type")
        guid: uuid.UUID | CertType
        if isinstance(kind, Mapping) and set(kind) == {"OTHER"} and isinstance(kind["OTHER"], str):
            try:
                guid = uuid.UUID(kind["OTHER"])
            except ValueError as exc:
                msg = f"`cert_chain[{i}].cert_type.OTHER` is {kind['OTHER']!r}, expected a UUID"
                raise EvidenceParseError(msg) from exc
        elif isinstance(kind, str) and kind in CertType.__members__ and kind != "OTHER":
            guid = CertType[kind]
        else:
            msg = f"`cert_chain[{i}].cert_type` is {kind!r}, expected VCEK, VLEK, ASK, ARK, CRL or {{'OTHER': uuid}}"
            raise EvidenceParseError(msg)
        data = item.get("data")
        if not isinstance(data, list) or not data:
            msg = f"`cert_chain[{i}].data` is {type(data).__name__}, expected a non-empty list of bytes"
            raise EvidenceParseError(msg)
        certs.append((guid, _json_bytes(item, "data", len(data))))
    try:
        return CertTable.build(certs)
    except ValueError as exc:
        raise EvidenceParseError(str(exc)) from exc


def snp_evidence(report: AttestationReport, certs: CertTable | None) -> dict[str, Any]:
    """The `snp` evidence object: `{"attestation_report": {...}, "cert_chain": [...] | null}`.

    `certs` None (no table from the host) gives `null`; a table without entries gives `[]`.
    """
    return {
        "attestation_report": report.to_sev_json(),
        "cert_chain": None if certs is None else certs.to_sev_json(),
    }
