"""What the benchmarks share: the result table, a dev KBS in its own process, first calls without client imports.

Every figure is reported against a floor measured in the same run (issue 13), as medians of interleaved rounds, so a
change in the shared machine's load hits the figure and its floor alike.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Row:
    """One line of `make bench`: a figure, its floor, their ratio and the goal (`limit`: the ratio's upper bound,
    or its lower bound when `at_least`)."""

    figure: str
    value: str
    floor: str
    ratio: float | None
    goal: str
    limit: float | None = None
    at_least: bool = False  # the goal is a lower bound (throughput)

    @property
    def verdict(self) -> str:
        if self.ratio is None or self.limit is None:
            return ""
        met = self.ratio >= self.limit if self.at_least else self.ratio <= self.limit
        return "ok" if met else "MISSED"


def machine() -> str:
    cpus = os.cpu_count() or 0
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    cpu = model or platform.machine()
    return f"{platform.system()} {platform.release()}, {cpus} CPUs ({cpu}), Python {platform.python_version()}"


def render(rows: list[Row]) -> str:
    head = ("figure", "measured", "floor", "ratio", "goal", "")
    cells = [
        head,
        *[(r.figure, r.value, r.floor, "" if r.ratio is None else f"{r.ratio:.2f}", r.goal, r.verdict) for r in rows],
    ]
    lines = ["| " + " | ".join(c) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
    return "\n".join(lines)


def compile_agent() -> None:
    """Byte-compile the guest package, as the guest image and `rootfs/install.sh` ship it: without this, a checkout
    with PYTHONDONTWRITEBYTECODE (or a read-only tree) compiles every module at every start, which the dependencies
    in site-packages never do, and start-up figures would measure the compiler."""
    import agent

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(agent.__file__).parent)], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class KbsProcess:
    """`cvm-tools dev-kbs` in its own process, as a real KBS is: no GIL shared with the agent or the client."""

    def __init__(self, resources: Path, *, token_minutes: float = 5.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._command = [str(BIN / "cvm-tools"), "dev-kbs", "--resources", str(resources), "--port", str(self.port)]
        self._command += ["--token-minutes", str(token_minutes)]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> KbsProcess:
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                if self._process.poll() is not None:
                    msg = f"dev KBS exited with {self._process.returncode}"
                    raise RuntimeError(msg) from None
                time.sleep(0.02)
            else:
                return self
        msg = "dev KBS did not listen within 30 s"
        raise RuntimeError(msg)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)


def ttrpc_request(service: str, method: str, payload: bytes = b"", stream: int = 1) -> bytes:
    """A ttRPC Request frame, written by hand so that measuring a first call costs the client nothing to import."""

    def field(number: int, value: bytes) -> bytes:
        return bytes([(number << 3) | 2, len(value)]) + value

    body = field(1, service.encode()) + field(2, method.encode()) + field(3, payload)
    return len(body).to_bytes(4, "big") + stream.to_bytes(4, "big") + bytes([1, 0]) + body


def ttrpc_call(path: str, service: str, method: str, payload: bytes = b"") -> bytes | None:
    """One call on a unix socket: the Response frame's body (status and payload), or None if none came back."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(path)
            sock.sendall(ttrpc_request(service, method, payload))
            header = sock.recv(10, socket.MSG_WAITALL)
            if len(header) != 10 or header[8] != 2:
                return None
            return sock.recv(int.from_bytes(header[:4], "big"), socket.MSG_WAITALL)
    except OSError:
        return None


def ttrpc_answered(path: str, service: str, method: str, payload: bytes = b"") -> bool:
    """True once a Response frame comes back (whatever its status)."""
    return ttrpc_call(path, service, method, payload) is not None


def http_answered(host: str, port: int, target: str = "/info") -> bool:
    try:
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            return sock.recv(16).startswith(b"HTTP/1.1 ")
    except OSError:
        return False


def smaps_rollup(pid: int) -> dict[str, int]:
    """KiB figures of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, Private_Dirty, ...)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0])
    return values


def private_kib(pid: int) -> int:
    rollup = smaps_rollup(pid)
    return rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
