"""Guest-device ioctls: the only module that opens, ioctls and closes ``/dev/sev-guest`` and ``/dev/tdx_guest``.

Edge module. Each call opens the device, issues its request through ctypes buffers from `agent.tee._uapi` (the
kernel writes through the pointers in the request structs), checks every status layer and closes the device.

Status layers, checked in this order: the ioctl errno, then (SEV-SNP) the firmware error and the VMM error from
``exitinfo2``, then the status word of the firmware's response message. EBUSY and EAGAIN are retried a bounded
number of times with exponential backoff through the injected `sleep` (EINTR at once, within the same bound);
every other failure raises `DeviceError` (carrying ``errno``, ``fw_error``, ``vmm_error``) whose one-line message
says what to check. A missing device raises `TeeUnavailable`. Bad arguments raise `ValueError` or `TypeError`
before any syscall.

A VMM BUSY status is not retried here: the mainline sev-guest driver already retries host throttling for 60 s,
then fails with ETIMEDOUT and disables the VMPCK, so a retry from userspace can only fail with ENOTTY.

Example::

    report = snp_get_report(report_data, vmpl=0)
    report, cert_table = snp_get_ext_report(report_data)
    td_report = tdx_get_report0(report_data)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.errors import DeviceError, EvidenceParseError, TeeUnavailable
from agent.tee import _uapi as uapi

__all__ = [
    "SNP_GUEST_DEVICE",
    "TDX_GUEST_DEVICE",
    "SNP_CERTS_INITIAL_BYTES",
    "RetryPolicy",
    "DEFAULT_RETRY",
    "snp_get_report",
    "snp_get_ext_report",
    "snp_get_derived_key",
    "tdx_get_report0",
    "describe_fw_error",
    "describe_vmm_error",
    "describe_snp_failure",
    "describe_tdx_failure",
]

SNP_GUEST_DEVICE = "/dev/sev-guest"
TDX_GUEST_DEVICE = "/dev/tdx_guest"

# Two pages hold a VCEK/VLEK + ASK + ARK table (about 4.8 KiB) in one request; larger tables grow the buffer.
SNP_CERTS_INITIAL_BYTES = 2 * uapi.PAGE_SIZE
_MAX_CERT_RESIZES = 3
_GUEST_FIELD_SELECT_BITS = 0x3F  # policy, image_id, family_id, measurement, guest_svn, tcb_version

Sleep = Callable[[float], None]
StrPath = str | os.PathLike[str]

_RETRYABLE = frozenset({errno.EBUSY, errno.EAGAIN})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Bounded retry of EBUSY/EAGAIN: `attempts` calls in all, waits doubling from `initial_delay_s`."""

    attempts: int = 5
    initial_delay_s: float = 0.25
    max_delay_s: float = 4.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            msg = f"`attempts` is {self.attempts}, expected at least 1"
            raise ValueError(msg)
        if not 0 <= self.initial_delay_s <= self.max_delay_s:
            msg = f"`initial_delay_s` is {self.initial_delay_s}, expected 0..`max_delay_s` ({self.max_delay_s})"
            raise ValueError(msg)


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class _Device:
    tee: str
    driver: str


_SNP = _Device(tee="SEV-SNP", driver="sev-guest")
_TDX = _Device(tee="TDX", driver="tdx-guest")


# --- status decoding (pure) ---------------------------------------------------------------------------------

_FW_MEANINGS = {
    uapi.SEV_RET_INVALID_PARAM: "a request field is invalid, e.g. a VMPL below the guest's own or a bad key selection",
    uapi.SEV_RET_INVALID_KEY: "the firmware cannot use the requested key",
    uapi.SNP_IOCTL_NO_FW_CALL: "the kernel failed the request before it reached the firmware",
    uapi.SEV_RET_NO_FW_CALL: "the hypervisor call failed, so the firmware never ran",
}
_VMM_MEANINGS = {
    uapi.SNP_GUEST_VMM_ERR_INVALID_LEN: "the certificate buffer is too small",
    uapi.SNP_GUEST_VMM_ERR_BUSY: "the host is throttling guest requests",
    uapi.SNP_GUEST_VMM_ERR_GENERIC: "the host failed the request",
}


def _errno_text(code: int) -> str:
    return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"


def describe_fw_error(code: int) -> str:
    """``firmware error 0x16 INVALID_PARAM (meaning)`` for a SEV firmware status."""
    name = uapi.SEV_RET_NAMES.get(code, "unknown status")
    meaning = _FW_MEANINGS.get(code)
    return f"firmware error {code:#x} {name}" + (f" ({meaning})" if meaning else "")


def describe_vmm_error(code: int) -> str:
    """``VMM error 2 BUSY (meaning)`` for the hypervisor half of ``exitinfo2``."""
    name = uapi.SNP_VMM_ERR_NAMES.get(code, "unknown status")
    meaning = _VMM_MEANINGS.get(code)
    return f"VMM error {code:#x} {name}" + (f" ({meaning})" if meaning else "")


_INTERRUPTED = "signals kept interrupting the request; check what is signalling the agent"
_VMPCK_WIPED = "the driver has disabled the VMPCK, so further requests fail until the guest reboots"


def _snp_advice(err: int, fw_error: int, vmm_error: int) -> str:
    """What to check for a failed SEV-SNP guest request, most specific layer first."""
    if err == errno.ENOTTY:
        return (
            "the kernel lacks this ioctl, or the driver disabled the VMPCK after an earlier failure "
            "(`VMPCK is disabled` in dmesg): reboot the guest"
        )
    if vmm_error == uapi.SNP_GUEST_VMM_ERR_BUSY:
        return f"the host throttled the request past the kernel's retry window; {_VMPCK_WIPED}"
    if fw_error == uapi.SEV_RET_NO_FW_CALL and vmm_error == uapi.SNP_GUEST_VMM_ERR_GENERIC:
        return f"check the hypervisor log for the failed GHCB guest request; {_VMPCK_WIPED}"
    if vmm_error:
        return f"check the hypervisor log; {_VMPCK_WIPED}"
    if fw_error not in (0, uapi.SNP_IOCTL_NO_FW_CALL):
        return f"check the request fields and the host's SNP firmware; {_VMPCK_WIPED}"
    if err == errno.EINVAL:
        return (
            "the driver rejected the arguments (msg_version, buffer pointers, or `certs_len` not a multiple "
            f"of {uapi.PAGE_SIZE:#x} or above its limit, {uapi.SEV_FW_BLOB_MAX_SIZE:#x} on mainline)"
        )
    if err in (errno.EFAULT, errno.ENOMEM):
        return "the driver could not use a request buffer; check dmesg for sev-guest messages"
    if err == errno.EINTR:
        return _INTERRUPTED
    return "check dmesg for sev-guest messages"


def describe_snp_failure(command: str, path: str, err: int, fw_error: int, vmm_error: int) -> str:
    """One-line message for a failed SEV-SNP ioctl: errno, firmware error, VMM error, then what to check."""
    layers = [_errno_text(err)]
    if fw_error:
        layers.append(describe_fw_error(fw_error))
    if vmm_error:
        layers.append(describe_vmm_error(vmm_error))
    return f"{command} on `{path}` failed: {'; '.join(layers)}. Check: {_snp_advice(err, fw_error, vmm_error)}."


def describe_tdx_failure(command: str, path: str, err: int) -> str:
    """One-line message for a failed TDX ioctl."""
    if err == errno.ENOTTY:
        advice = "the kernel lacks this ioctl (the tdx-guest driver has it from v6.2)"
    elif err in (errno.ENXIO, errno.EINVAL):
        advice = "TDG.MR.REPORT rejected its operands (ENXIO from v6.16, EINVAL before); check dmesg"
    elif err == errno.EIO:
        advice = "the TDG.MR.REPORT TDCALL failed; check dmesg for tdx messages"
    elif err == errno.EINTR:
        advice = _INTERRUPTED
    else:
        advice = "check dmesg for tdx-guest messages"
    return f"{command} on `{path}` failed: {_errno_text(err)}. Check: {advice}."


# --- the syscall site ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _opened(path: StrPath, device: _Device) -> Iterator[int]:
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            msg = (
                f"`{name}` is not available ({_errno_text(code)}): not a {device.tee} guest, "
                f"or the `{device.driver}` driver is not loaded"
            )
            raise TeeUnavailable(msg) from exc
        if code in (errno.EACCES, errno.EPERM):
            msg = f"permission denied opening `{name}`: run the agent as root or check the device's mode and owner"
        else:
            msg = f"cannot open `{name}`: {_errno_text(code)}"
        raise DeviceError(msg, errno=code) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """One ioctl; returns 0 or the errno. `arg` is passed by address and updated in place."""
    try:
        fcntl.ioctl(fd, request, arg, True)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _with_retry(call: Callable[[], int], sleep: Sleep, retry: RetryPolicy) -> tuple[int, int]:
    """Runs `call` until it neither fails busy nor is interrupted, or the attempts run out.

    Returns (errno, attempts used). Busy failures wait with exponential backoff; EINTR (a signal whose handler
    did not raise; Python's `fcntl.ioctl` does not retry it) is repeated at once, as PEP 475 does for os calls.
    """
    delay = retry.initial_delay_s
    for attempt in range(1, retry.attempts + 1):
        err = call()
        if attempt == retry.attempts or (err not in _RETRYABLE and err != errno.EINTR):
            return err, attempt
        if err != errno.EINTR:
            sleep(delay)
            delay = min(delay * 2, retry.max_delay_s)
    msg = "unreachable: RetryPolicy.attempts is at least 1"
    raise AssertionError(msg)


def _busy_error(command: str, path: str, err: int, attempts: int, **status: int) -> DeviceError:
    msg = (
        f"{command} on `{path}` failed: {_errno_text(err)} after {attempts} attempts. "
        "Check: another process may be using the device; retry later, not in a loop."
    )
    return DeviceError(msg, errno=err, **status)


def _snp_call(
    fd: int, request: int, req: ctypes.Structure, resp: ctypes.Structure, *, sleep: Sleep, retry: RetryPolicy
) -> tuple[int, int, uapi.SnpGuestRequestIoctl]:
    ioc = uapi.SnpGuestRequestIoctl(
        msg_version=uapi.SNP_MSG_VERSION, req_data=ctypes.addressof(req), resp_data=ctypes.addressof(resp)
    )

    def once() -> int:
        ioc.exitinfo2 = 0  # the kernel copies the struct back only when exitinfo2 is non-zero
        return _ioctl(fd, request, ioc)

    err, attempts = _with_retry(once, sleep, retry)
    return err, attempts, ioc


def _snp_raise(command: str, path: str, err: int, attempts: int, ioc: uapi.SnpGuestRequestIoctl) -> DeviceError:
    fw_error, vmm_error = ioc.fw_error, ioc.vmm_error
    if err in _RETRYABLE:
        return _busy_error(command, path, err, attempts, fw_error=fw_error, vmm_error=vmm_error)
    msg = describe_snp_failure(command, path, err, fw_error, vmm_error)
    return DeviceError(msg, errno=err, fw_error=fw_error, vmm_error=vmm_error)


# --- argument checks ----------------------------------------------------------------------------------------


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes):
        msg = f"`{name}` is {type(value).__name__}, expected bytes"
        raise TypeError(msg)
    if len(value) != size:
        msg = f"`{name}` is {len(value)} bytes, expected {size}"
        raise ValueError(msg)


def _check_uint(name: str, value: object, bits: int, *, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"`{name}` is {type(value).__name__}, expected int"
        raise TypeError(msg)
    top = (1 << bits) - 1 if maximum is None else maximum
    if not 0 <= value <= top:
        msg = f"`{name}` is {value}, expected 0..{top}"
        raise ValueError(msg)


def _report_req(user_data: bytes, vmpl: int) -> uapi.SnpReportReq:
    _check_bytes("user_data", user_data, uapi.SNP_REPORT_USER_DATA_SIZE)
    _check_uint("vmpl", vmpl, 32, maximum=3)
    data = (ctypes.c_uint8 * uapi.SNP_REPORT_USER_DATA_SIZE).from_buffer_copy(user_data)
    return uapi.SnpReportReq(user_data=data, vmpl=vmpl)


def _report_from_resp(command: str, path: str, resp: uapi.SnpReportResp, vmpl: int) -> bytes:
    raw = bytes(resp)
    hdr = uapi.SnpMsgReportRspHdr.from_buffer_copy(raw)
    if hdr.status != uapi.SEV_RET_SUCCESS:
        msg = (
            f"{command} on `{path}`: the firmware answered {describe_fw_error(hdr.status)}. "
            f"Check: `vmpl` ({vmpl}) is not below the VMPL the guest runs at (configfs `privlevel_floor`)."
        )
        raise DeviceError(msg, errno=0, fw_error=hdr.status, vmm_error=0)
    if hdr.report_size != uapi.SNP_REPORT_SIZE:
        msg = f"SNP report_size is {hdr.report_size:#x}, expected {uapi.SNP_REPORT_SIZE:#x}"
        raise EvidenceParseError(msg, offset=uapi.offsetof(uapi.SnpMsgReportRspHdr, "report_size"))
    start = ctypes.sizeof(uapi.SnpMsgReportRspHdr)
    return raw[start : start + uapi.SNP_REPORT_SIZE]


# --- public calls -------------------------------------------------------------------------------------------


def snp_get_report(
    user_data: bytes,
    *,
    vmpl: int = 0,
    path: StrPath = SNP_GUEST_DEVICE,
    sleep: Sleep = time.sleep,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> bytes:
    """SNP_GET_REPORT: the 1184-byte attestation report with REPORT_DATA = `user_data` at `vmpl`.

    Raises:
        ValueError, TypeError: `user_data` is not 64 bytes or `vmpl` is not 0..3 (before any syscall).
        TeeUnavailable: the device does not exist.
        DeviceError: the open, the ioctl or the firmware failed.
        EvidenceParseError: the firmware's response has an unexpected report size.
    """
    req = _report_req(user_data, vmpl)
    resp = uapi.SnpReportResp()
    command, name = "SNP_GET_REPORT", os.fspath(path)
    with _opened(name, _SNP) as fd:
        err, attempts, ioc = _snp_call(fd, uapi.SNP_GET_REPORT, req, resp, sleep=sleep, retry=retry)
    if err:
        raise _snp_raise(command, name, err, attempts, ioc)
    return _report_from_resp(command, name, resp, vmpl)


def snp_get_ext_report(
    user_data: bytes,
    *,
    vmpl: int = 0,
    path: StrPath = SNP_GUEST_DEVICE,
    initial_certs_bytes: int = SNP_CERTS_INITIAL_BYTES,
    max_certs_bytes: int = uapi.SEV_FW_BLOB_MAX_SIZE,
    sleep: Sleep = time.sleep,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> tuple[bytes, bytes]:
    """SNP_GET_EXT_REPORT: the attestation report and the host's certificate table.

    The certificate buffer starts at `initial_certs_bytes`; when the host answers that it is too small (EIO with
    VMM INVALID_LEN and the needed length in `certs_len`), it is resized and the request repeated, at most
    `_MAX_CERT_RESIZES` times and never beyond `max_certs_bytes`. The table is returned as the kernel wrote it:
    the whole buffer, all zeros when the host supplied no certificates (parse it with `agent.tee.snp`).

    Raises:
        ValueError, TypeError: bad `user_data`, `vmpl` or buffer sizes (before any syscall).
        TeeUnavailable, DeviceError, EvidenceParseError: as for `snp_get_report`.
    """
    req_data = _report_req(user_data, vmpl)
    for label, size in (("initial_certs_bytes", initial_certs_bytes), ("max_certs_bytes", max_certs_bytes)):
        _check_uint(label, size, 32)
        if size == 0 or size % uapi.PAGE_SIZE:
            msg = f"`{label}` is {size:#x}, expected a non-zero multiple of {uapi.PAGE_SIZE:#x}"
            raise ValueError(msg)
    if initial_certs_bytes > max_certs_bytes:
        msg = f"`initial_certs_bytes` is {initial_certs_bytes:#x}, expected at most `max_certs_bytes`"
        raise ValueError(msg)

    command, name = "SNP_GET_EXT_REPORT", os.fspath(path)
    certs_len = initial_certs_bytes
    with _opened(name, _SNP) as fd:
        for _ in range(_MAX_CERT_RESIZES + 1):
            certs = (ctypes.c_uint8 * certs_len)()
            resp = uapi.SnpReportResp()
            req = uapi.SnpExtReportReq(data=req_data, certs_address=ctypes.addressof(certs), certs_len=certs_len)
            err, attempts, ioc = _snp_call(fd, uapi.SNP_GET_EXT_REPORT, req, resp, sleep=sleep, retry=retry)
            if not err:
                return _report_from_resp(command, name, resp, vmpl), bytes(certs)
            status = {"errno": err, "fw_error": ioc.fw_error, "vmm_error": ioc.vmm_error}
            if ioc.vmm_error != uapi.SNP_GUEST_VMM_ERR_INVALID_LEN or ioc.fw_error or err != errno.EIO:
                raise _snp_raise(command, name, err, attempts, ioc)
            needed = -(-req.certs_len // uapi.PAGE_SIZE) * uapi.PAGE_SIZE
            if needed <= certs_len:
                msg = (
                    f"{command} on `{name}`: the host reports a {certs_len:#x}-byte certificate buffer too small "
                    f"but asks for {req.certs_len:#x} bytes. Check: the hypervisor's certificate blob."
                )
                raise DeviceError(msg, **status)
            if needed > max_certs_bytes:
                msg = (
                    f"{command} on `{name}`: the host's certificate table needs {needed:#x} bytes, more than "
                    f"`max_certs_bytes` ({max_certs_bytes:#x}). Check: raise `max_certs_bytes` if the driver "
                    f"accepts more (mainline stops at {uapi.SEV_FW_BLOB_MAX_SIZE:#x})."
                )
                raise DeviceError(msg, **status)
            certs_len = needed
    msg = (
        f"{command} on `{name}`: the certificate buffer was still too small after {_MAX_CERT_RESIZES} resizes. "
        "Check: the hypervisor keeps changing its certificate blob."
    )
    raise DeviceError(msg, errno=errno.EIO, fw_error=0, vmm_error=uapi.SNP_GUEST_VMM_ERR_INVALID_LEN)


def snp_get_derived_key(
    *,
    root_key_select: int,
    guest_field_select: int,
    vmpl: int,
    guest_svn: int,
    tcb_version: int,
    path: StrPath = SNP_GUEST_DEVICE,
    sleep: Sleep = time.sleep,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> bytes:
    """SNP_GET_DERIVED_KEY: a 32-byte key derived by the firmware. The key is secret; it never enters a message.

    Args:
        root_key_select: 0 = VCEK, 1 = VMRK.
        guest_field_select: bits 0..5 = policy, image_id, family_id, measurement, guest_svn, tcb_version.
        vmpl: 0..3, not below the guest's own VMPL.
        guest_svn: u32 mixed into the key (must not exceed the guest's SVN).
        tcb_version: u64 TCB_VERSION mixed into the key.

    Raises:
        ValueError, TypeError: an argument is out of range (before any syscall).
        TeeUnavailable, DeviceError: as for `snp_get_report`.
    """
    _check_uint("root_key_select", root_key_select, 32, maximum=1)
    _check_uint("guest_field_select", guest_field_select, 64, maximum=_GUEST_FIELD_SELECT_BITS)
    _check_uint("vmpl", vmpl, 32, maximum=3)
    _check_uint("guest_svn", guest_svn, 32)
    _check_uint("tcb_version", tcb_version, 64)
    req = uapi.SnpDerivedKeyReq(
        root_key_select=root_key_select,
        guest_field_select=guest_field_select,
        vmpl=vmpl,
        guest_svn=guest_svn,
        tcb_version=tcb_version,
    )
    resp = uapi.SnpDerivedKeyResp()
    command, name = "SNP_GET_DERIVED_KEY", os.fspath(path)
    try:
        with _opened(name, _SNP) as fd:
            err, attempts, ioc = _snp_call(fd, uapi.SNP_GET_DERIVED_KEY, req, resp, sleep=sleep, retry=retry)
        if err:
            raise _snp_raise(command, name, err, attempts, ioc)
        rsp = uapi.SnpMsgKeyRsp.from_buffer(resp)
        if rsp.status != uapi.SEV_RET_SUCCESS:
            msg = (
                f"{command} on `{name}`: the firmware answered {describe_fw_error(rsp.status)}. "
                f"Check: `vmpl` ({vmpl}) against the guest's VMPL, and `guest_svn`/`tcb_version` against the "
                "launched guest."
            )
            raise DeviceError(msg, errno=0, fw_error=rsp.status, vmm_error=0)
        return bytes(rsp.key)
    finally:
        ctypes.memset(ctypes.addressof(resp), 0, ctypes.sizeof(resp))


def tdx_get_report0(
    report_data: bytes,
    *,
    path: StrPath = TDX_GUEST_DEVICE,
    sleep: Sleep = time.sleep,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> bytes:
    """TDX_CMD_GET_REPORT0: the 1024-byte TDREPORT_STRUCT with REPORTDATA = `report_data`.

    Raises:
        ValueError, TypeError: `report_data` is not 64 bytes (before any syscall).
        TeeUnavailable: the device does not exist.
        DeviceError: the open or the ioctl failed.
    """
    _check_bytes("report_data", report_data, uapi.TDX_REPORTDATA_LEN)
    req = uapi.TdxReportReq(reportdata=(ctypes.c_uint8 * uapi.TDX_REPORTDATA_LEN).from_buffer_copy(report_data))
    command, name = "TDX_CMD_GET_REPORT0", os.fspath(path)
    with _opened(name, _TDX) as fd:
        err, attempts = _with_retry(lambda: _ioctl(fd, uapi.TDX_CMD_GET_REPORT0, req), sleep, retry)
    if err in _RETRYABLE:
        raise _busy_error(command, name, err, attempts)
    if err:
        raise DeviceError(describe_tdx_failure(command, name, err), errno=err)
    return bytes(req.tdreport)
