"""agent.tee._device for real: os.open/fcntl.ioctl/os.close in a child process under the LD_PRELOAD shim."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.tee import _uapi as uapi
from agent.tee._device import SNP_CERTS_INITIAL_BYTES

if TYPE_CHECKING:  # a runtime import would defeat the plugin's assertion rewriting
    from tests.fakes.shim import GuestDevShim, ShimError, ShimRun

pytest_plugins = ("tests.fakes.shim",)
pytestmark = pytest.mark.integration

REPORT_DATA = bytes(range(64))
CERT_TABLE = "snp/cert_table_SYNTH_milan_gosevguest.bin"  # 4772 bytes: needs two pages


def assert_closed(run: ShimRun, opens: int = 1) -> None:
    """The device was opened `opens` times and every descriptor was closed."""
    assert run.log.opens == opens, run.log
    assert run.log.closes == opens, run.log


def ioctl_errnos(run: ShimRun) -> list[int]:
    return [event.errno for event in run.log.ioctls]


def expect_error(run: ShimRun, error_type: str = "DeviceError") -> ShimError:
    assert run.error is not None, run.value
    assert run.error.type == error_type, run.error
    return run.error


@pytest.fixture
def shim(guestdev_shim: GuestDevShim, tmp_path: Path) -> _Runner:
    return _Runner(guestdev_shim, tmp_path)


class _Runner:
    def __init__(self, shim: GuestDevShim, tmp_path: Path) -> None:
        self._shim = shim
        self._tmp_path = tmp_path

    @property
    def sev_path(self) -> Path:
        return self._tmp_path / "dev" / "sev-guest"

    def __call__(self, code: str, **settings: object) -> ShimRun:
        run = self._shim.run_python(code, tmp_path=self._tmp_path, settings=settings)
        assert run.returncode == 0, run.stderr
        return run


class TestSnpGetReport:
    def test_report_carries_user_data_and_vmpl(self, shim: _Runner) -> None:
        run = shim(f"emit(snp_get_report({REPORT_DATA!r}, vmpl=2, path=SEV))")
        report = run.value
        assert len(report) == uapi.SNP_REPORT_SIZE
        assert report[0x50:0x90] == REPORT_DATA
        assert int.from_bytes(report[0x30:0x34], "little") == 2
        assert int.from_bytes(report[0:4], "little") == 2  # VERSION of the built-in report
        assert [(e.request, e.errno) for e in run.log.ioctls] == [(uapi.SNP_GET_REPORT, 0)]
        assert_closed(run)

    def test_template(self, shim: _Runner, vectors: Path) -> None:
        path = vectors / "hw" / "snp" / "report_v3_milan_vlek_vmpl1_trustee.bin"
        template = path.read_bytes()
        run = shim(f"emit(snp_get_report({REPORT_DATA!r}, vmpl=1, path=SEV))", SNP_REPORT=path)
        assert run.value == template[:0x50] + REPORT_DATA + template[0x90:]

    def test_firmware_status_in_the_response(self, shim: _Runner) -> None:
        run = shim("emit(snp_get_report(bytes(64), vmpl=0, path=SEV))", VMPL_FLOOR=1)
        error = expect_error(run)
        assert error.message == (
            f"SNP_GET_REPORT on `{shim.sev_path}`: the firmware answered firmware error 0x16 INVALID_PARAM "
            "(a request field is invalid, e.g. a VMPL below the guest's own or a bad key selection). "
            "Check: `vmpl` (0) is not below the VMPL the guest runs at (configfs `privlevel_floor`)."
        )
        assert (error.errno, error.fw_error, error.vmm_error) == (0, 0x16, 0)
        assert_closed(run)

    def test_invalid_key_status(self, shim: _Runner) -> None:
        error = expect_error(shim("snp_get_report(bytes(64), path=SEV)", REPORT_STATUS=0x27))
        assert "firmware error 0x27 INVALID_KEY" in error.message
        assert error.fw_error == 0x27


class TestSnpGetExtReport:
    def test_certificate_buffer_grows(self, shim: _Runner, vectors: Path) -> None:
        table = (vectors / "hw" / CERT_TABLE).read_bytes()
        run = shim(
            f"emit(snp_get_ext_report({REPORT_DATA!r}, path=SEV, initial_certs_bytes=4096))",
            SNP_CERTS=vectors / "hw" / CERT_TABLE,
        )
        report, certs = run.value
        assert report[0x50:0x90] == REPORT_DATA
        assert certs == table + bytes(0x2000 - len(table))
        assert [(e.request, e.errno) for e in run.log.ioctls] == [
            (uapi.SNP_GET_EXT_REPORT, errno.EIO),
            (uapi.SNP_GET_EXT_REPORT, 0),
        ]
        assert_closed(run)

    def test_default_buffer_fits_a_chain(self, shim: _Runner, vectors: Path) -> None:
        run = shim("emit(snp_get_ext_report(bytes(64), path=SEV))", SNP_CERTS=vectors / "hw" / CERT_TABLE)
        assert run.value[1].startswith((vectors / "hw" / CERT_TABLE).read_bytes())
        assert ioctl_errnos(run) == [0]

    def test_host_without_certificates(self, shim: _Runner) -> None:
        run = shim("emit(snp_get_ext_report(bytes(64), vmpl=3, path=SEV))")
        report, certs = run.value
        assert int.from_bytes(report[0x30:0x34], "little") == 3
        assert certs == bytes(SNP_CERTS_INITIAL_BYTES)

    def test_larger_driver_limit(self, shim: _Runner, tmp_path: Path) -> None:
        blob = tmp_path / "big-table.bin"
        blob.write_bytes(b"\x5a" * 20000)
        run = shim(
            "emit(snp_get_ext_report(bytes(64), path=SEV, max_certs_bytes=0x10000)[1])",
            SNP_CERTS=blob,
            CERTS_MAX=0x10000,
        )
        assert run.value == b"\x5a" * 20000 + bytes(0x5000 - 20000)
        assert ioctl_errnos(run) == [errno.EIO, 0]

    def test_table_beyond_max_certs_bytes(self, shim: _Runner, tmp_path: Path) -> None:
        blob = tmp_path / "big-table.bin"
        blob.write_bytes(b"\x5a" * 20000)
        error = expect_error(shim("snp_get_ext_report(bytes(64), path=SEV)", SNP_CERTS=blob))
        assert error.message.endswith(
            "the host's certificate table needs 0x5000 bytes, more than `max_certs_bytes` (0x4000). "
            "Check: raise `max_certs_bytes` if the driver accepts more (mainline stops at 0x4000)."
        )
        assert (error.errno, error.fw_error, error.vmm_error) == (errno.EIO, 0, uapi.SNP_GUEST_VMM_ERR_INVALID_LEN)

    def test_invalid_length_without_a_larger_size(self, shim: _Runner) -> None:
        """A host that says INVALID_LEN but asks for no more than was offered is not retried."""
        run = shim("snp_get_ext_report(bytes(64), path=SEV)", VMM_ERROR=uapi.SNP_GUEST_VMM_ERR_INVALID_LEN)
        error = expect_error(run)
        assert error.message.endswith(
            "the host reports a 0x2000-byte certificate buffer too small but asks for 0x2000 bytes. "
            "Check: the hypervisor's certificate blob."
        )
        assert (error.errno, error.fw_error, error.vmm_error) == (errno.EIO, 0, uapi.SNP_GUEST_VMM_ERR_INVALID_LEN)
        assert ioctl_errnos(run) == [errno.EIO]
        assert_closed(run)

    def test_driver_rejects_oversized_buffer(self, shim: _Runner, tmp_path: Path) -> None:
        """Raising `max_certs_bytes` beyond what the driver accepts surfaces the driver's EINVAL."""
        blob = tmp_path / "big-table.bin"
        blob.write_bytes(b"\x5a" * 20000)
        error = expect_error(shim("snp_get_ext_report(bytes(64), path=SEV, max_certs_bytes=0x10000)", SNP_CERTS=blob))
        assert "failed: EINVAL (Invalid argument); firmware error 0xff NO_FW_CALL" in error.message
        assert "`certs_len` not a multiple of 0x1000 or above its limit" in error.message
        assert (error.errno, error.fw_error, error.vmm_error) == (errno.EINVAL, 0xFF, 0)


class TestSnpGetDerivedKey:
    CALL = (
        "snp_get_derived_key(root_key_select={r}, guest_field_select={g}, vmpl=0, guest_svn=1, tcb_version=2, path=SEV)"
    )

    def test_key(self, shim: _Runner) -> None:
        run = shim(
            f"emit([{self.CALL.format(r=0, g=0x3F)}, {self.CALL.format(r=0, g=0x3F)}, {self.CALL.format(r=1, g=0)}])"
        )
        first, again, other = run.value
        assert len(first) == uapi.SNP_DERIVED_KEY_SIZE
        assert first == again
        assert other != first
        assert [e.request for e in run.log.ioctls] == [uapi.SNP_GET_DERIVED_KEY] * 3
        assert_closed(run, opens=3)

    def test_firmware_status(self, shim: _Runner) -> None:
        error = expect_error(shim(self.CALL.format(r=0, g=0), REPORT_STATUS=0x16))
        assert "SNP_GET_DERIVED_KEY on" in error.message
        assert "firmware error 0x16 INVALID_PARAM" in error.message
        assert (error.errno, error.fw_error) == (0, 0x16)


class TestTdxGetReport0:
    def test_report(self, shim: _Runner) -> None:
        run = shim(f"emit(tdx_get_report0({REPORT_DATA!r}, path=TDX))")
        report = run.value
        assert len(report) == uapi.TDX_REPORT_LEN
        assert report[0] == 0x81
        assert report[128:192] == REPORT_DATA
        assert [(e.device, e.request, e.errno) for e in run.log.ioctls] == [("tdx", uapi.TDX_CMD_GET_REPORT0, 0)]
        assert_closed(run)

    def test_template(self, shim: _Runner, vectors: Path) -> None:
        path = vectors / "hw" / "tdx" / "tdreport_v1_tdx15_guestcomponents.bin"
        template = path.read_bytes()
        run = shim(f"emit(tdx_get_report0({REPORT_DATA!r}, path=TDX))", TDX_REPORT=path)
        assert run.value == template[:128] + REPORT_DATA + template[192:]

    @pytest.mark.parametrize(
        ("err", "text"),
        [
            (errno.ENOTTY, "failed: ENOTTY (Inappropriate ioctl for device). Check: the kernel lacks this ioctl"),
            (errno.ENXIO, "failed: ENXIO (No such device or address). Check: TDG.MR.REPORT rejected its operands"),
            (errno.EIO, "failed: EIO (Input/output error). Check: the TDG.MR.REPORT TDCALL failed"),
        ],
    )
    def test_errno_layer(self, shim: _Runner, err: int, text: str) -> None:
        run = shim("tdx_get_report0(bytes(64), path=TDX)", ERRNO=err)
        error = expect_error(run)
        assert text in error.message
        assert (error.errno, error.fw_error, error.vmm_error) == (err, None, None)
        assert ioctl_errnos(run) == [err]
        assert_closed(run)


class TestSnpStatusLayers:
    def test_errno(self, shim: _Runner) -> None:
        run = shim("snp_get_report(bytes(64), path=SEV)", ERRNO=errno.EFAULT)
        error = expect_error(run)
        assert error.message == (
            f"SNP_GET_REPORT on `{shim.sev_path}` failed: EFAULT (Bad address); firmware error 0xff NO_FW_CALL "
            "(the kernel failed the request before it reached the firmware). "
            "Check: the driver could not use a request buffer; check dmesg for sev-guest messages."
        )
        assert (error.errno, error.fw_error, error.vmm_error) == (errno.EFAULT, 0xFF, 0)
        assert_closed(run)

    def test_enotty(self, shim: _Runner) -> None:
        error = expect_error(shim("snp_get_ext_report(bytes(64), path=SEV)", ERRNO=errno.ENOTTY))
        assert "Check: the kernel lacks this ioctl, or the driver disabled the VMPCK" in error.message

    def test_firmware_error_then_vmpck_disabled(self, shim: _Runner) -> None:
        code = """
errors = []
for _ in range(2):
    try:
        snp_get_report(bytes(64), path=SEV)
    except Exception as exc:
        errors.append([str(exc), exc.errno, exc.fw_error, exc.vmm_error])
emit(errors)
"""
        run = shim(code, FW_ERROR=0x16)
        (first, *status1), (second, *status2) = run.value
        assert "failed: EIO (Input/output error); firmware error 0x16 INVALID_PARAM" in first
        assert "Check: check the request fields and the host's SNP firmware; the driver has disabled the VMPCK" in first
        assert status1 == [errno.EIO, 0x16, 0]
        assert "failed: ENOTTY" in second
        assert status2 == [errno.ENOTTY, 0xFF, 0]
        assert_closed(run, opens=2)

    @pytest.mark.parametrize(
        ("vmm", "err", "text"),
        [
            (0xFFFFFFFF, errno.EIO, "failed: EIO (Input/output error); VMM error 0xffffffff GENERIC"),
            (
                2,
                errno.ETIMEDOUT,
                "VMM error 0x2 BUSY (the host is throttling guest requests). Check: the host throttled",
            ),
            (9, errno.EIO, "VMM error 0x9 unknown status. Check: check the hypervisor log"),
        ],
    )
    def test_vmm_error(self, shim: _Runner, vmm: int, err: int, text: str) -> None:
        run = shim("snp_get_report(bytes(64), path=SEV, sleep=lambda s: 1 / 0)", VMM_ERROR=vmm)
        error = expect_error(run)
        assert text in error.message
        assert (error.errno, error.fw_error, error.vmm_error) == (err, 0, vmm)
        assert ioctl_errnos(run) == [err]  # a VMM BUSY reaching userspace is not retried
        assert_closed(run)

    def test_hypervisor_call_failed(self, shim: _Runner) -> None:
        error = expect_error(shim("snp_get_report(bytes(64), path=SEV)", FW_ERROR=0xFFFFFFFF, VMM_ERROR=0xFFFFFFFF))
        assert "firmware error 0xffffffff NO_FW_CALL" in error.message
        assert "Check: check the hypervisor log for the failed GHCB guest request" in error.message


class TestBusyRetry:
    @pytest.mark.parametrize(
        ("call", "busy_errno"),
        [
            ("snp_get_report(bytes(64), path=SEV, sleep=sleeps.append)", errno.EAGAIN),
            ("snp_get_ext_report(bytes(64), path=SEV, sleep=sleeps.append)[0]", errno.EBUSY),
            ("tdx_get_report0(bytes(64), path=TDX, sleep=sleeps.append)", errno.EBUSY),
        ],
    )
    def test_busy_then_success(self, shim: _Runner, call: str, busy_errno: int) -> None:
        run = shim(f"sleeps = []\nemit([{call}, sleeps])", BUSY_COUNT=2, BUSY_ERRNO=busy_errno)
        assert run.error is None, run.error
        report, sleeps = run.value
        assert len(report) in (uapi.SNP_REPORT_SIZE, uapi.TDX_REPORT_LEN)
        assert sleeps == [0.25, 0.5]
        assert ioctl_errnos(run) == [busy_errno, busy_errno, 0]
        assert_closed(run)

    @pytest.mark.parametrize(
        "call",
        [
            "snp_get_report(bytes(64), path=SEV, sleep=sleeps.append)",
            "tdx_get_report0(bytes(64), path=TDX, sleep=sleeps.append)",
        ],
    )
    def test_interrupted_call_is_repeated_at_once(self, shim: _Runner, call: str) -> None:
        run = shim(f"sleeps = []\nemit([{call}, sleeps])", BUSY_COUNT=2, BUSY_ERRNO=errno.EINTR)
        assert run.error is None, run.error
        assert run.value[1] == []
        assert ioctl_errnos(run) == [errno.EINTR, errno.EINTR, 0]

    def test_interrupted_forever_gives_up(self, shim: _Runner) -> None:
        error = expect_error(shim("tdx_get_report0(bytes(64), path=TDX, sleep=lambda s: 1 / 0)", ERRNO=errno.EINTR))
        assert error.message.endswith(
            "failed: EINTR (Interrupted system call). "
            "Check: signals kept interrupting the request; check what is signalling the agent."
        )

    def test_busy_forever_gives_up(self, shim: _Runner) -> None:
        code = (
            "sleeps = []\n"
            "try:\n    snp_get_report(bytes(64), path=SEV, sleep=sleeps.append)\n"
            "finally:\n    emit(sleeps)"
        )
        run = shim(code, BUSY_COUNT=-1)
        error = expect_error(run)
        assert error.message == (
            f"SNP_GET_REPORT on `{shim.sev_path}` failed: EBUSY (Device or resource busy) after 5 attempts. "
            "Check: another process may be using the device; retry later, not in a loop."
        )
        assert (error.errno, error.fw_error, error.vmm_error) == (errno.EBUSY, 0, uapi.SNP_GUEST_VMM_ERR_BUSY)
        assert run.value == [0.25, 0.5, 1.0, 2.0]
        assert ioctl_errnos(run) == [errno.EBUSY] * 5
        assert_closed(run)

    def test_policy_bounds_attempts_and_delay(self, shim: _Runner) -> None:
        code = (
            "sleeps = []\n"
            "policy = RetryPolicy(attempts=4, initial_delay_s=1.0, max_delay_s=1.5)\n"
            "try:\n    tdx_get_report0(bytes(64), path=TDX, sleep=sleeps.append, retry=policy)\n"
            "finally:\n    emit(sleeps)"
        )
        run = shim(code, BUSY_COUNT=-1)
        error = expect_error(run)
        assert "failed: EBUSY (Device or resource busy) after 4 attempts" in error.message
        assert run.value == [1.0, 1.5, 1.5]
        assert ioctl_errnos(run) == [errno.EBUSY] * 4


class TestOpenAndArguments:
    def test_permission_denied(self, shim: _Runner) -> None:
        run = shim("tdx_get_report0(bytes(64), path=TDX)", OPEN_ERRNO=errno.EACCES)
        error = expect_error(run)
        assert re.fullmatch(
            r"permission denied opening `.*/dev/tdx_guest`: run the agent as root or check the device's mode and owner",
            error.message,
        )
        assert error.errno == errno.EACCES
        assert run.log.ioctls == ()
        assert run.log.closes == 0

    @pytest.mark.parametrize("err", [errno.ENOENT, errno.ENODEV, errno.ENXIO])
    def test_no_device(self, shim: _Runner, err: int) -> None:
        error = expect_error(shim("snp_get_report(bytes(64), path=SEV)", OPEN_ERRNO=err), "TeeUnavailable")
        assert "not a SEV-SNP guest, or the `sev-guest` driver is not loaded" in error.message

    @pytest.mark.parametrize(
        "call",
        [
            "snp_get_report(bytes(63), path=SEV)",
            "snp_get_report(bytes(64), vmpl=4, path=SEV)",
            "snp_get_ext_report(bytes(64), path=SEV, initial_certs_bytes=100)",
            "snp_get_derived_key(root_key_select=2, guest_field_select=0, vmpl=0, guest_svn=0, tcb_version=0, "
            "path=SEV)",
            "tdx_get_report0(bytearray(64), path=TDX)",
        ],
    )
    def test_bad_arguments_make_no_syscall(self, shim: _Runner, call: str) -> None:
        run = shim(call)
        assert run.error is not None
        assert run.error.type in {"ValueError", "TypeError"}
        assert run.log.events == ()

    def test_other_files_and_ioctls_pass_through(self, shim: _Runner, tmp_path: Path) -> None:
        plain = tmp_path / "plain.txt"
        plain.write_text("real file")
        code = f"""
import fcntl, os, termios
fd = os.open({str(plain)!r}, os.O_RDONLY)
data = os.read(fd, 100)
try:
    fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
    result = None
except OSError as exc:
    result = exc.errno
os.close(fd)
emit([data, result])
"""
        run = shim(code)
        assert run.value == [b"real file", errno.ENOTTY]
        assert run.log.events == ()


class TestShimFidelity:
    """The shim answers malformed requests the way the mainline driver does."""

    RAW = """
import ctypes, fcntl, os
from agent.tee import _uapi as u
fd = os.open(SEV, os.O_RDWR)
req = u.SnpExtReportReq(certs_len={certs_len}, certs_address=1)
resp = u.SnpReportResp()
ioc = u.SnpGuestRequestIoctl(msg_version={version}, req_data=ctypes.addressof(req), resp_data=ctypes.addressof(resp))
try:
    fcntl.ioctl(fd, {request}, ioc)
    err = 0
except OSError as exc:
    err = exc.errno
os.close(fd)
emit([err, ioc.exitinfo2])
"""

    def test_msg_version_zero(self, shim: _Runner) -> None:
        run = shim(self.RAW.format(certs_len=0, version=0, request=uapi.SNP_GET_REPORT))
        assert run.value == [errno.EINVAL, 0]  # rejected before exitinfo2 is preset, nothing copied back

    def test_unaligned_certs_len(self, shim: _Runner) -> None:
        run = shim(self.RAW.format(certs_len=1000, version=1, request=uapi.SNP_GET_EXT_REPORT))
        assert run.value == [errno.EINVAL, uapi.SNP_IOCTL_NO_FW_CALL]

    def test_unknown_command(self, shim: _Runner) -> None:
        request = uapi.ioc(3, "S", 9, 32)
        run = shim(self.RAW.format(certs_len=0, version=1, request=request))
        assert run.value == [errno.ENOTTY, uapi.SNP_IOCTL_NO_FW_CALL]
