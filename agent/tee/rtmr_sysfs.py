"""TDX RTMRs through the Linux 6.16+ measurement sysfs (`tdx_measurements_dir`). Edge (sysfs).

hw-abi.md §4: `rtmr0:sha384` … `rtmr3:sha384` read the current 48-byte value; a write of exactly 48 bytes at
offset 0 extends, `RTMR[i] = SHA384(RTMR[i] ‖ data)` (anything else is EINVAL). The kernel keeps no log of it.
Each extend is one `write(2)` of the 48 bytes; a short write or an error becomes `DeviceError` with the errno.
Whether an extend that failed (EINTR, say) took effect is for the caller to find out by reading the register.
"""

from __future__ import annotations

import errno as errno_mod
import os
from pathlib import Path
from typing import Final

from agent.errors import DeviceError, TeeUnavailable

__all__ = ["RTMR_LEN", "SysfsRtmrs"]

RTMR_LEN: Final = 48
_COUNT: Final = 4
_NAME: Final = "rtmr{}:sha384"
_MAX_READ: Final = 4096


class SysfsRtmrs:
    """RTMR0..3 as files under `folder` (the real sysfs directory, or an emulation of it)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, rtmr: int) -> Path:
        if not 0 <= rtmr < _COUNT:
            msg = f"`rtmr` is {rtmr}, expected 0..{_COUNT - 1}"
            raise ValueError(msg)
        return self.folder / _NAME.format(rtmr)

    def missing(self) -> str | None:
        """Why the registers cannot be used here (the files are absent), or None."""
        for i in range(_COUNT):
            if not self.path(i).is_file():
                return f"`{self.path(i)}` does not exist (the measurement sysfs needs Linux >= 6.16)"
        return None

    def read(self, rtmr: int) -> bytes:
        path = self.path(rtmr)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            msg = f"TDX measurement register `{path}` does not exist"
            raise TeeUnavailable(msg) from exc
        except OSError as exc:
            msg = f"TDX measurement register `{path}` cannot be opened: {exc.strerror}"
            raise DeviceError(msg, errno=exc.errno) from exc
        try:
            value = os.read(fd, _MAX_READ)
        except OSError as exc:
            msg = f"TDX measurement register `{path}` cannot be read: {exc.strerror}"
            raise DeviceError(msg, errno=exc.errno) from exc
        finally:
            os.close(fd)
        if len(value) != RTMR_LEN:
            msg = f"TDX measurement register `{path}` is {len(value)} bytes, expected {RTMR_LEN}"
            raise DeviceError(msg)
        return value

    def read_all(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.read(0), self.read(1), self.read(2), self.read(3))

    def extend(self, rtmr: int, data: bytes) -> None:
        """Extend RTMR `rtmr` with exactly 48 bytes, in one write at offset 0."""
        if len(data) != RTMR_LEN:
            msg = f"extend data is {len(data)} bytes, expected exactly {RTMR_LEN}"
            raise ValueError(msg)
        path = self.path(rtmr)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            msg = f"TDX measurement register `{path}` cannot be opened for extending: {exc.strerror}"
            raise DeviceError(msg, errno=exc.errno) from exc
        try:
            written = os.pwrite(fd, data, 0)
        except OSError as exc:
            msg = f"extending `{path}` failed: {exc.strerror}"
            raise DeviceError(msg, errno=exc.errno) from exc
        finally:
            os.close(fd)
        if written != RTMR_LEN:
            msg = f"extending `{path}` wrote {written} bytes, expected {RTMR_LEN}"
            raise DeviceError(msg, errno=errno_mod.EIO)
