"""agent.tee._device without a device: status decoding, messages, argument checks, open failures."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from agent.errors import DeviceError, TeeUnavailable
from agent.tee import _device as dev
from agent.tee import _uapi as uapi


def _never_sleep(seconds: float) -> None:
    msg = f"slept {seconds}s without a reason"
    raise AssertionError(msg)


class TestDescribeFwError:
    @pytest.mark.parametrize(
        ("code", "text"),
        [
            (
                0x16,
                "firmware error 0x16 INVALID_PARAM (a request field is invalid, e.g. a VMPL below the guest's own "
                "or a bad key selection)",
            ),
            (0x27, "firmware error 0x27 INVALID_KEY (the firmware cannot use the requested key)"),
            (0xFF, "firmware error 0xff NO_FW_CALL (the kernel failed the request before it reached the firmware)"),
            (
                0xFFFFFFFF,
                "firmware error 0xffffffff NO_FW_CALL (the hypervisor call failed, so the firmware never ran)",
            ),
            (0x07, "firmware error 0x7 POLICY_FAILURE"),
            (0x99, "firmware error 0x99 unknown status"),
        ],
    )
    def test_text(self, code: int, text: str) -> None:
        assert dev.describe_fw_error(code) == text

    def test_every_named_status_decodes(self) -> None:
        for code, name in uapi.SEV_RET_NAMES.items():
            assert name in dev.describe_fw_error(code)


class TestDescribeVmmError:
    @pytest.mark.parametrize(
        ("code", "text"),
        [
            (1, "VMM error 0x1 INVALID_LEN (the certificate buffer is too small)"),
            (2, "VMM error 0x2 BUSY (the host is throttling guest requests)"),
            (0xFFFFFFFF, "VMM error 0xffffffff GENERIC (the host failed the request)"),
            (7, "VMM error 0x7 unknown status"),
        ],
    )
    def test_text(self, code: int, text: str) -> None:
        assert dev.describe_vmm_error(code) == text


class TestDescribeSnpFailure:
    def test_errno_only(self) -> None:
        text = dev.describe_snp_failure("SNP_GET_REPORT", "/dev/sev-guest", errno.EFAULT, 0, 0)
        assert text == (
            "SNP_GET_REPORT on `/dev/sev-guest` failed: EFAULT (Bad address). "
            "Check: the driver could not use a request buffer; check dmesg for sev-guest messages."
        )

    def test_layers_in_order(self) -> None:
        text = dev.describe_snp_failure("SNP_GET_REPORT", "/dev/x", errno.EIO, 0x16, 0xFFFFFFFF)
        assert text.index("EIO") < text.index("firmware error 0x16") < text.index("VMM error 0xffffffff")
        assert "\n" not in text

    @pytest.mark.parametrize(
        ("err", "fw", "vmm", "advice"),
        [
            (errno.ENOTTY, 0xFF, 0, "the kernel lacks this ioctl, or the driver disabled the VMPCK"),
            (errno.ETIMEDOUT, 0, 2, "the host throttled the request past the kernel's retry window"),
            (errno.EIO, 0xFFFFFFFF, 0xFFFFFFFF, "check the hypervisor log for the failed GHCB guest request"),
            (errno.EIO, 0, 0xFFFFFFFF, "check the hypervisor log; the driver has disabled the VMPCK"),
            (errno.EIO, 0x16, 0, "check the request fields and the host's SNP firmware"),
            (errno.EINVAL, 0xFF, 0, "`certs_len` not a multiple of 0x1000 or above its limit, 0x4000 on mainline"),
            (errno.EIO, 0, 0, "check dmesg for sev-guest messages"),
        ],
    )
    def test_advice(self, err: int, fw: int, vmm: int, advice: str) -> None:
        assert advice in dev.describe_snp_failure("SNP_GET_EXT_REPORT", "/dev/x", err, fw, vmm)


class TestDescribeTdxFailure:
    @pytest.mark.parametrize(
        ("err", "advice"),
        [
            (errno.ENOTTY, "ENOTTY (Inappropriate ioctl for device). Check: the kernel lacks this ioctl"),
            (errno.ENXIO, "TDG.MR.REPORT rejected its operands (ENXIO from v6.16, EINVAL before)"),
            (errno.EINVAL, "TDG.MR.REPORT rejected its operands"),
            (errno.EIO, "the TDG.MR.REPORT TDCALL failed"),
            (errno.EFAULT, "check dmesg for tdx-guest messages"),
        ],
    )
    def test_advice(self, err: int, advice: str) -> None:
        text = dev.describe_tdx_failure("TDX_CMD_GET_REPORT0", "/dev/tdx_guest", err)
        assert text.startswith("TDX_CMD_GET_REPORT0 on `/dev/tdx_guest` failed: ")
        assert advice in text


class TestRetryPolicy:
    def test_defaults(self) -> None:
        assert dev.RetryPolicy(attempts=5, initial_delay_s=0.25, max_delay_s=4.0) == dev.DEFAULT_RETRY

    @pytest.mark.parametrize(
        ("attempts", "initial", "message"),
        [
            (0, 0.25, "`attempts` is 0, expected at least 1"),
            (5, -1.0, "`initial_delay_s` is -1.0, expected 0..`max_delay_s` (4.0)"),
            (5, 5.0, "`initial_delay_s` is 5.0, expected 0..`max_delay_s` (4.0)"),
        ],
    )
    def test_rejects(self, attempts: int, initial: float, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            dev.RetryPolicy(attempts=attempts, initial_delay_s=initial)


class TestArgumentChecks:
    """Bad arguments are rejected before the device is opened (the path here does not exist)."""

    @pytest.fixture
    def missing(self, tmp_path: Path) -> Path:
        return tmp_path / "no-such-device"

    @pytest.mark.parametrize(
        ("user_data", "vmpl", "exc", "message"),
        [
            (bytes(63), 0, ValueError, "`user_data` is 63 bytes, expected 64"),
            (bytes(65), 0, ValueError, "`user_data` is 65 bytes, expected 64"),
            (bytearray(64), 0, TypeError, "`user_data` is bytearray, expected bytes"),
            (bytes(64), 4, ValueError, "`vmpl` is 4, expected 0..3"),
            (bytes(64), -1, ValueError, "`vmpl` is -1, expected 0..3"),
            (bytes(64), True, TypeError, "`vmpl` is bool, expected int"),
        ],
    )
    def test_snp_reports(
        self, missing: Path, user_data: object, vmpl: object, exc: type[Exception], message: str
    ) -> None:
        with pytest.raises(exc, match=re.escape(message)):
            dev.snp_get_report(user_data, vmpl=vmpl, path=missing, sleep=_never_sleep)  # type: ignore[arg-type]  # wrong types on purpose
        with pytest.raises(exc, match=re.escape(message)):
            dev.snp_get_ext_report(user_data, vmpl=vmpl, path=missing, sleep=_never_sleep)  # type: ignore[arg-type]  # wrong types on purpose

    @pytest.mark.parametrize(
        ("initial", "maximum", "message"),
        [
            (1000, 0x4000, "`initial_certs_bytes` is 0x3e8, expected a non-zero multiple of 0x1000"),
            (0x2000, 0, "`max_certs_bytes` is 0x0, expected a non-zero multiple of 0x1000"),
            (0x8000, 0x4000, "`initial_certs_bytes` is 0x8000, expected at most `max_certs_bytes`"),
            (1 << 32, 1 << 33, "`initial_certs_bytes` is 4294967296, expected 0..4294967295"),
        ],
    )
    def test_ext_report_buffer_sizes(self, missing: Path, initial: int, maximum: int, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)):
            dev.snp_get_ext_report(bytes(64), path=missing, initial_certs_bytes=initial, max_certs_bytes=maximum)

    @pytest.mark.parametrize(
        ("override", "message"),
        [
            ({"root_key_select": 2}, "`root_key_select` is 2, expected 0..1"),
            ({"guest_field_select": 0x40}, "`guest_field_select` is 64, expected 0..63"),
            ({"vmpl": 4}, "`vmpl` is 4, expected 0..3"),
            ({"guest_svn": 1 << 32}, "`guest_svn` is 4294967296, expected 0..4294967295"),
            ({"tcb_version": -1}, "`tcb_version` is -1, expected 0..18446744073709551615"),
        ],
    )
    def test_derived_key(self, missing: Path, override: dict[str, int], message: str) -> None:
        def call(
            root_key_select: int = 0,
            guest_field_select: int = 0,
            vmpl: int = 0,
            guest_svn: int = 0,
            tcb_version: int = 0,
        ) -> bytes:
            return dev.snp_get_derived_key(
                root_key_select=root_key_select,
                guest_field_select=guest_field_select,
                vmpl=vmpl,
                guest_svn=guest_svn,
                tcb_version=tcb_version,
                path=missing,
            )

        with pytest.raises(ValueError, match=re.escape(message)):
            call(**override)

    @pytest.mark.parametrize("size", [0, 63, 65])
    def test_tdx_report_data(self, missing: Path, size: int) -> None:
        with pytest.raises(ValueError, match=re.escape(f"`report_data` is {size} bytes, expected 64")):
            dev.tdx_get_report0(bytes(size), path=missing)


class TestOpenFailures:
    def test_missing_snp_device(self, tmp_path: Path) -> None:
        path = tmp_path / "sev-guest"
        message = (
            f"`{path}` is not available (ENOENT (No such file or directory)): not a SEV-SNP guest, "
            "or the `sev-guest` driver is not loaded"
        )
        with pytest.raises(TeeUnavailable, match=re.escape(message)):
            dev.snp_get_report(bytes(64), path=path)

    def test_missing_tdx_device(self, tmp_path: Path) -> None:
        with pytest.raises(TeeUnavailable, match=re.escape("not a TDX guest, or the `tdx-guest` driver")):
            dev.tdx_get_report0(bytes(64), path=tmp_path / "tdx_guest")

    def test_not_a_device(self, tmp_path: Path) -> None:
        """A directory cannot be opened read-write: the errno is reported, not hidden."""
        with pytest.raises(DeviceError, match=re.escape(f"cannot open `{tmp_path}`: EISDIR")) as info:
            dev.tdx_get_report0(bytes(64), path=tmp_path)
        assert info.value.errno == errno.EISDIR

    def test_regular_file_gets_enotty(self, tmp_path: Path) -> None:
        """A plain file accepts open() but not the ioctl: the real kernel answers ENOTTY."""
        path = tmp_path / "tdx_guest"
        path.write_bytes(b"")
        with pytest.raises(DeviceError, match=re.escape("failed: ENOTTY")) as info:
            dev.tdx_get_report0(bytes(64), path=path, sleep=_never_sleep)
        assert (info.value.errno, info.value.fw_error, info.value.vmm_error) == (errno.ENOTTY, None, None)

    def test_regular_file_snp(self, tmp_path: Path) -> None:
        path = tmp_path / "sev-guest"
        path.write_bytes(b"")
        with pytest.raises(DeviceError, match=re.escape("SNP_GET_REPORT on")) as info:
            dev.snp_get_report(bytes(64), path=str(path), sleep=_never_sleep)
        assert (info.value.errno, info.value.fw_error, info.value.vmm_error) == (errno.ENOTTY, 0, 0)
