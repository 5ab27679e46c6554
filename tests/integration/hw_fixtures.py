"""Helpers for the hardware end-to-end tests: the daemon as a subprocess, pointed at emulated TEE interfaces."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HwDaemon", "cli", "path_flags"]


def cli(
    *args: str, env: Mapping[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """`python -m agent ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        timeout=60,
        check=False,
        env=dict(env) if env is not None else None,
        input=stdin,
    )


def path_flags(
    tmp_path: Path,
    *,
    tsm_root: Path | None = None,
    sev_guest_device: Path | None = None,
    sev_platform: bool = False,
    ccel_data: Path | None = None,
) -> list[str]:
    """Flags pointing every kernel interface at tmp_path; only the ones given (or created here) exist."""
    nothing = tmp_path / "absent"
    platform = tmp_path / "platform" / "sev-guest"
    if sev_platform:
        platform.mkdir(parents=True, exist_ok=True)
    return [
        "--tsm-report-dir",
        str(tsm_root or nothing / "tsm" / "report"),
        "--tdx-guest-device",
        str(nothing / "tdx_guest"),
        "--sev-guest-device",
        str(sev_guest_device or nothing / "sev-guest"),
        "--sev-guest-platform-dir",
        str(platform),
        "--tdx-measurements-dir",
        str(nothing / "measurements"),
        "--ccel-data",
        str(ccel_data or nothing / "CCEL"),
    ]


class HwDaemon:
    """`cvm-agent serve` in a subprocess, waited for through NOTIFY_SOCKET."""

    def __init__(self, tmp_path: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.socket = str(tmp_path / "d" / "agent.sock")
        notify_path = str(tmp_path / "notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        self.notify.settimeout(20)
        self.log_path = tmp_path / "daemon.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--socket", self.socket, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**(env if env is not None else os.environ), "NOTIFY_SOCKET": notify_path},
        )

    def wait_ready(self) -> None:
        try:
            message = self.notify.recv(4096)
        except TimeoutError:
            self.stop()
            msg = f"daemon did not become ready:\n{self.log}"
            raise AssertionError(msg) from None
        fields = message.split(b"\n")
        assert fields[0] == b"READY=1", self.log
        assert f"MAINPID={self.process.pid}".encode() in fields, self.log

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=20)
        self._log.close()
        self.notify.close()
        return code

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
