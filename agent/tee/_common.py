"""Helpers shared by the hardware attesters: report-data sizing, digest fitting, optional file reads. Edge.

Only `read_optional` touches the file system.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Final

from agent.errors import DeviceError, EvidenceMismatch, InvalidRequest

__all__ = ["REPORT_DATA_LEN", "require_init_data", "pad_report_data", "read_optional"]

REPORT_DATA_LEN: Final = 64  # TDX REPORTDATA and SNP REPORT_DATA
MAX_FILE_BYTES: Final = 16 * 1024 * 1024  # CCEL regions are a few hundred KiB to a few MiB


def pad_report_data(runtime_data: bytes, tee: str) -> bytes:
    """`runtime_data` zero-padded on the right to 64 bytes; longer input is the caller's error."""
    if len(runtime_data) > REPORT_DATA_LEN:
        msg = (
            f"runtime data is {len(runtime_data)} bytes, expected at most {REPORT_DATA_LEN} for {tee} "
            "(it becomes the hardware report data; hash longer data first)"
        )
        raise InvalidRequest(msg)
    return runtime_data.ljust(REPORT_DATA_LEN, b"\x00")


def require_init_data(register: str, expected: bytes, actual: bytes) -> None:
    """Raise `EvidenceMismatch` (naming both values in hex) unless `actual` equals `expected`."""
    if actual == expected:
        return
    msg = (
        f"the initdata digest is inconsistent with the platform: {register} is {actual.hex()}, "
        f"expected {expected.hex()} (the digest zero-padded/truncated to {len(expected)} bytes)"
    )
    raise EvidenceMismatch(msg)


def read_optional(path: str | Path, what: str, *, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """The bytes of `path`, or None when it does not exist; other failures raise `DeviceError` with advice."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:  # noqa: PTH123 - one open for both the error mapping and the bounded read
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        code = exc.errno
        if code in (errno.EACCES, errno.EPERM):
            msg = f"permission denied reading {what} `{name}`: the agent must run as root"
        else:
            msg = f"reading {what} `{name}` failed: {exc.strerror or exc}"
        raise DeviceError(msg, errno=code) from exc
    if len(data) > max_bytes:
        msg = f"{what} `{name}` is larger than {max_bytes:#x} bytes"
        raise DeviceError(msg, errno=errno.EFBIG)
    return data
