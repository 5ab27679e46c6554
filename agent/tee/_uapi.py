"""Kernel ABI of the guest attestation devices: ctypes mirrors, ioctl numbers, status codes.

This is the one module that declares the Linux uapi structures of ``/dev/sev-guest`` and ``/dev/tdx_guest``.
Nothing here does I/O; `agent.tee._device` is the only user that hands these structures to the kernel.

Sources (x86_64):

- ``include/uapi/linux/sev-guest.h``: ``snp_report_req``, ``snp_report_resp``, ``snp_derived_key_req``,
  ``snp_derived_key_resp``, ``snp_guest_request_ioctl``, ``snp_ext_report_req``, the ``SNP_*`` ioctls and the
  ``SNP_GUEST_VMM_ERR_*`` codes.
- ``include/uapi/linux/tdx-guest.h``: ``tdx_report_req`` and ``TDX_CMD_GET_REPORT0``.
- ``include/uapi/linux/psp-sev.h``: the ``SEV_RET_*`` firmware status codes.
- ``include/uapi/asm-generic/ioctl.h``: the ``_IOC`` encoding.
- SEV-SNP firmware ABI (``MSG_REPORT_RSP``, ``MSG_KEY_RSP``): the layout of the response buffers' contents.

Every size and offset is checked at import time against the values the C compiler reports for the headers
(``tests/vectors/hw/abi_ground_truth.txt``), so a platform with a different ABI fails loudly on import
instead of corrupting kernel requests.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Mapping

__all__ = [
    # ioctl encoding
    "IOC_NONE",
    "IOC_WRITE",
    "IOC_READ",
    "ioc",
    "iowr",
    "offsetof",
    # sev-guest.h
    "SNP_GUEST_REQ_IOC_TYPE",
    "SNP_MSG_VERSION",
    "SNP_REPORT_USER_DATA_SIZE",
    "SNP_REPORT_RESP_SIZE",
    "SNP_DERIVED_KEY_RESP_SIZE",
    "SNP_GUEST_FW_ERR_MASK",
    "SNP_GUEST_VMM_ERR_SHIFT",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "SNP_GUEST_VMM_ERR_BUSY",
    "SNP_GUEST_VMM_ERR_GENERIC",
    "SNP_IOCTL_NO_FW_CALL",
    "SEV_FW_BLOB_MAX_SIZE",
    "PAGE_SIZE",
    "SnpReportReq",
    "SnpReportResp",
    "SnpDerivedKeyReq",
    "SnpDerivedKeyResp",
    "SnpGuestRequestIoctl",
    "SnpExtReportReq",
    "SNP_GET_REPORT",
    "SNP_GET_DERIVED_KEY",
    "SNP_GET_EXT_REPORT",
    # firmware response payloads
    "SnpMsgReportRspHdr",
    "SnpMsgKeyRsp",
    "SNP_REPORT_SIZE",
    "SNP_DERIVED_KEY_SIZE",
    "SEV_RET_SUCCESS",
    "SEV_RET_INVALID_PARAM",
    "SEV_RET_INVALID_KEY",
    "SEV_RET_NO_FW_CALL",
    "SEV_RET_NAMES",
    "SNP_VMM_ERR_NAMES",
    # tdx-guest.h
    "TDX_REPORTDATA_LEN",
    "TDX_REPORT_LEN",
    "TdxReportReq",
    "TDX_CMD_GET_REPORT0",
]

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h; x86 uses the generic layout) ---------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def ioc(direction: int, ioc_type: str, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, type, nr, size)``: ``dir << 30 | size << 16 | type << 8 | nr``."""
    code = ord(ioc_type)
    if not 0 <= direction < 1 << _IOC_DIRBITS:
        msg = f"`direction` is {direction}, expected 0..3"
        raise ValueError(msg)
    if not 0 <= code < 1 << _IOC_TYPEBITS:
        msg = f"`ioc_type` is {ioc_type!r}, expected a single byte"
        raise ValueError(msg)
    if not 0 <= nr < 1 << _IOC_NRBITS:
        msg = f"`nr` is {nr}, expected 0..255"
        raise ValueError(msg)
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        msg = f"`size` is {size:#x}, expected below {1 << _IOC_SIZEBITS:#x}"
        raise ValueError(msg)
    return direction << _IOC_DIRSHIFT | size << _IOC_SIZESHIFT | code << _IOC_TYPESHIFT | nr << _IOC_NRSHIFT


def iowr(ioc_type: str, nr: int, struct_type: type[ctypes.Structure]) -> int:
    """The kernel's ``_IOWR(type, nr, struct)``, with the size taken from the ctypes mirror."""
    return ioc(IOC_READ | IOC_WRITE, ioc_type, nr, ctypes.sizeof(struct_type))


def offsetof(struct_type: type[ctypes.Structure], field: str) -> int:
    """``offsetof(struct, field)`` for a ctypes mirror (anonymous-union members included)."""
    return int(getattr(struct_type, field).offset)


_U8 = ctypes.c_uint8
_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64

# --- <linux/sev-guest.h> ------------------------------------------------------------------------------------

SNP_GUEST_REQ_IOC_TYPE = "S"
SNP_MSG_VERSION = 1  # `msg_version` must be non-zero (0 -> EINVAL); every known client sends 1
SNP_REPORT_USER_DATA_SIZE = 64
SNP_REPORT_RESP_SIZE = 4000
SNP_DERIVED_KEY_RESP_SIZE = 64

SNP_GUEST_FW_ERR_MASK = 0xFFFFFFFF  # the header spells it GENMASK_ULL(31, 0), which userspace cannot expand
SNP_GUEST_VMM_ERR_SHIFT = 32
SNP_GUEST_VMM_ERR_INVALID_LEN = 1
SNP_GUEST_VMM_ERR_BUSY = 2
SNP_GUEST_VMM_ERR_GENERIC = 0xFFFFFFFF  # ~0U: KVM's "any other host error"

# The ioctl entry point (drivers/virt/coco/sev-guest) presets `exitinfo2` to 0xff and copies the struct back
# whenever it is non-zero, so a failure before the request reaches the firmware reads back as fw_error 0xff.
SNP_IOCTL_NO_FW_CALL = 0xFF

# include/linux/psp-sev.h (kernel-internal): the largest certificate buffer the driver accepts.
SEV_FW_BLOB_MAX_SIZE = 0x4000
PAGE_SIZE = 4096  # x86_64; `certs_len` must be a multiple of it


class SnpReportReq(ctypes.Structure):
    """``struct snp_report_req``: 64 bytes of user data, the VMPL to report, 28 reserved (zero) bytes."""

    _fields_ = (
        ("user_data", _U8 * SNP_REPORT_USER_DATA_SIZE),
        ("vmpl", _U32),
        ("rsvd", _U8 * 28),
    )
    user_data: ctypes.Array[ctypes.c_uint8]
    vmpl: int
    rsvd: ctypes.Array[ctypes.c_uint8]


class SnpReportResp(ctypes.Structure):
    """``struct snp_report_resp``: the decrypted MSG_REPORT_RSP (see `SnpMsgReportRspHdr`)."""

    _fields_ = (("data", _U8 * SNP_REPORT_RESP_SIZE),)
    data: ctypes.Array[ctypes.c_uint8]


class SnpDerivedKeyReq(ctypes.Structure):
    """``struct snp_derived_key_req`` (MSG_KEY_REQ)."""

    _fields_ = (
        ("root_key_select", _U32),
        ("rsvd", _U32),
        ("guest_field_select", _U64),
        ("vmpl", _U32),
        ("guest_svn", _U32),
        ("tcb_version", _U64),
    )
    root_key_select: int
    rsvd: int
    guest_field_select: int
    vmpl: int
    guest_svn: int
    tcb_version: int


class SnpDerivedKeyResp(ctypes.Structure):
    """``struct snp_derived_key_resp``: the decrypted MSG_KEY_RSP (see `SnpMsgKeyRsp`)."""

    _fields_ = (("data", _U8 * SNP_DERIVED_KEY_RESP_SIZE),)
    data: ctypes.Array[ctypes.c_uint8]


class _SnpExitinfo2Parts(ctypes.Structure):
    _fields_ = (("fw_error", _U32), ("vmm_error", _U32))


class _SnpExitinfo2(ctypes.Union):
    _anonymous_ = ("_parts",)
    _fields_ = (("exitinfo2", _U64), ("_parts", _SnpExitinfo2Parts))


class SnpGuestRequestIoctl(ctypes.Structure):
    """``struct snp_guest_request_ioctl``; `fw_error`/`vmm_error` alias the low/high halves of `exitinfo2`.

    `req_data` and `resp_data` are user addresses: the kernel reads the request from the first and writes the
    response to the second.
    """

    _anonymous_ = ("_exitinfo2",)
    _fields_ = (
        ("msg_version", _U8),
        ("req_data", _U64),
        ("resp_data", _U64),
        ("_exitinfo2", _SnpExitinfo2),
    )
    msg_version: int
    req_data: int
    resp_data: int
    exitinfo2: int
    fw_error: int
    vmm_error: int


class SnpExtReportReq(ctypes.Structure):
    """``struct snp_ext_report_req``: a report request plus the user buffer for the host's certificate table.

    On a too-small buffer the kernel fails with EIO, `vmm_error` = `SNP_GUEST_VMM_ERR_INVALID_LEN`, and writes
    the required length (a multiple of `PAGE_SIZE`) back into `certs_len`.
    """

    _fields_ = (
        ("data", SnpReportReq),
        ("certs_address", _U64),
        ("certs_len", _U32),
    )
    data: SnpReportReq
    certs_address: int
    certs_len: int


SNP_GET_REPORT = iowr(SNP_GUEST_REQ_IOC_TYPE, 0x0, SnpGuestRequestIoctl)
SNP_GET_DERIVED_KEY = iowr(SNP_GUEST_REQ_IOC_TYPE, 0x1, SnpGuestRequestIoctl)
SNP_GET_EXT_REPORT = iowr(SNP_GUEST_REQ_IOC_TYPE, 0x2, SnpGuestRequestIoctl)

# --- SEV-SNP firmware messages carried in the response buffers ----------------------------------------------

SNP_REPORT_SIZE = 0x4A0  # the attestation report, every version so far
SNP_DERIVED_KEY_SIZE = 32


class SnpMsgReportRspHdr(ctypes.Structure):
    """MSG_REPORT_RSP header at the start of `SnpReportResp.data`; the report follows at offset 0x20."""

    _fields_ = (("status", _U32), ("report_size", _U32), ("rsvd", _U8 * 24))
    status: int
    report_size: int
    rsvd: ctypes.Array[ctypes.c_uint8]


class SnpMsgKeyRsp(ctypes.Structure):
    """MSG_KEY_RSP, the whole of `SnpDerivedKeyResp.data`."""

    _fields_ = (("status", _U32), ("rsvd", _U8 * 28), ("key", _U8 * SNP_DERIVED_KEY_SIZE))
    status: int
    rsvd: ctypes.Array[ctypes.c_uint8]
    key: ctypes.Array[ctypes.c_uint8]


# <linux/psp-sev.h> `sev_ret_code`: firmware statuses, seen in `fw_error` and in the response `status` field.
SEV_RET_SUCCESS = 0x00
SEV_RET_INVALID_PARAM = 0x16
SEV_RET_INVALID_KEY = 0x27
SEV_RET_NO_FW_CALL = 0xFFFFFFFF  # -1 in the enum: the kernel could not reach the firmware at all

SEV_RET_NAMES: Mapping[int, str] = {
    0x00: "SUCCESS",
    0x01: "INVALID_PLATFORM_STATE",
    0x02: "INVALID_GUEST_STATE",
    0x03: "INVALID_CONFIG",
    0x04: "INVALID_LEN",
    0x05: "ALREADY_OWNED",
    0x06: "INVALID_CERTIFICATE",
    0x07: "POLICY_FAILURE",
    0x08: "INACTIVE",
    0x09: "INVALID_ADDRESS",
    0x0A: "BAD_SIGNATURE",
    0x0B: "BAD_MEASUREMENT",
    0x0C: "ASID_OWNED",
    0x0D: "INVALID_ASID",
    0x0E: "WBINVD_REQUIRED",
    0x0F: "DFFLUSH_REQUIRED",
    0x10: "INVALID_GUEST",
    0x11: "INVALID_COMMAND",
    0x12: "ACTIVE",
    0x13: "HWSEV_RET_PLATFORM",
    0x14: "HWSEV_RET_UNSAFE",
    0x15: "UNSUPPORTED",
    0x16: "INVALID_PARAM",
    0x17: "RESOURCE_LIMIT",
    0x18: "SECURE_DATA_INVALID",
    0x19: "INVALID_PAGE_SIZE",
    0x1A: "INVALID_PAGE_STATE",
    0x1B: "INVALID_MDATA_ENTRY",
    0x1C: "INVALID_PAGE_OWNER",
    0x1D: "AEAD_OFLOW",
    0x1F: "EXIT_RING_BUFFER",
    0x20: "RMP_INIT_REQUIRED",
    0x21: "BAD_SVN",
    0x22: "BAD_VERSION",
    0x23: "SHUTDOWN_REQUIRED",
    0x24: "UPDATE_FAILED",
    0x25: "RESTORE_REQUIRED",
    0x26: "RMP_INITIALIZATION_FAILED",
    0x27: "INVALID_KEY",
    SNP_IOCTL_NO_FW_CALL: "NO_FW_CALL",
    SEV_RET_NO_FW_CALL: "NO_FW_CALL",
}

SNP_VMM_ERR_NAMES: Mapping[int, str] = {
    SNP_GUEST_VMM_ERR_INVALID_LEN: "INVALID_LEN",
    SNP_GUEST_VMM_ERR_BUSY: "BUSY",
    SNP_GUEST_VMM_ERR_GENERIC: "GENERIC",
}

# --- <linux/tdx-guest.h> ------------------------------------------------------------------------------------

TDX_REPORTDATA_LEN = 64
TDX_REPORT_LEN = 1024


class TdxReportReq(ctypes.Structure):
    """``struct tdx_report_req``: REPORTDATA in, the 1024-byte TDREPORT_STRUCT out, in one buffer."""

    _fields_ = (
        ("reportdata", _U8 * TDX_REPORTDATA_LEN),
        ("tdreport", _U8 * TDX_REPORT_LEN),
    )
    reportdata: ctypes.Array[ctypes.c_uint8]
    tdreport: ctypes.Array[ctypes.c_uint8]


TDX_CMD_GET_REPORT0 = iowr("T", 1, TdxReportReq)

# --- import-time checks against the C compiler's view of the headers ----------------------------------------

_EXPECTED_SIZES: tuple[tuple[type[ctypes.Structure], int], ...] = (
    (SnpReportReq, 96),
    (SnpReportResp, 4000),
    (SnpDerivedKeyReq, 32),
    (SnpDerivedKeyResp, 64),
    (SnpGuestRequestIoctl, 32),
    (SnpExtReportReq, 112),
    (SnpMsgReportRspHdr, 0x20),
    (SnpMsgKeyRsp, 64),
    (TdxReportReq, 1088),
)
_EXPECTED_OFFSETS: tuple[tuple[type[ctypes.Structure], str, int], ...] = (
    (SnpReportReq, "vmpl", 64),
    (SnpReportReq, "rsvd", 68),
    (SnpDerivedKeyReq, "guest_field_select", 8),
    (SnpDerivedKeyReq, "vmpl", 16),
    (SnpDerivedKeyReq, "tcb_version", 24),
    (SnpGuestRequestIoctl, "req_data", 8),
    (SnpGuestRequestIoctl, "resp_data", 16),
    (SnpGuestRequestIoctl, "exitinfo2", 24),
    (SnpGuestRequestIoctl, "fw_error", 24),
    (SnpGuestRequestIoctl, "vmm_error", 28),
    (SnpExtReportReq, "certs_address", 96),
    (SnpExtReportReq, "certs_len", 104),
    (SnpMsgKeyRsp, "key", 0x20),
    (TdxReportReq, "tdreport", 64),
)


def _check_abi() -> None:
    if struct.pack("=I", 1) != struct.pack("<I", 1):
        msg = "the guest-device ABI mirrors assume a little-endian (x86_64) machine"
        raise ImportError(msg)
    for struct_type, want in _EXPECTED_SIZES:
        got = ctypes.sizeof(struct_type)
        if got != want:
            msg = f"sizeof({struct_type.__name__}) is {got}, expected {want}: not the x86_64 kernel ABI"
            raise ImportError(msg)
    for struct_type, field, want in _EXPECTED_OFFSETS:
        got = offsetof(struct_type, field)
        if got != want:
            name = f"{struct_type.__name__}.{field}"
            msg = f"offsetof({name}) is {got}, expected {want}: not the x86_64 kernel ABI"
            raise ImportError(msg)


_check_abi()
