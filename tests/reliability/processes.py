"""The daemon (gRPC + both ttRPC sockets) and api-server-rest as subprocesses, with their RSS and open fds.

Memory and descriptor figures are read from /proc/<pid>, so what is measured is the real server process, not
the test's. A `Sampler` polls RSS in a thread to catch the peak of an attack.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cvm_tools.devkbs.server import DevKbsServer

from tests.integration.hw_fixtures import HwDaemon

__all__ = ["Sampler", "Served", "client_fds", "fd_count", "rss_mib", "serve_everything"]

BIG_RESOURCE = 3 * 1024 * 1024
KEK = bytes(range(32))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    msg = f"no VmRSS for {pid}"
    raise RuntimeError(msg)


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _socket_inodes(
    pid: int, table: str, local_port: int | None = None, paths: frozenset[str] = frozenset()
) -> set[str]:
    inodes: set[str] = set()
    try:
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    except FileNotFoundError:
        return inodes
    for line in lines:
        fields = line.split()
        if table == "unix":
            if len(fields) > 7 and fields[7] in paths:  # accepted sockets show the listener's path
                inodes.add(fields[6])
        elif local_port is None or int(fields[1].rsplit(":", 1)[1], 16) == local_port:
            inodes.add(fields[9])
    return inodes


def client_fds(pid: int, *, unix_paths: frozenset[str] = frozenset(), tcp_port: int | None = None) -> int:
    """Open descriptors of `pid` for local clients: sockets bound to `unix_paths`, or TCP sockets on `tcp_port`.

    Outgoing connections (the KBS client's keep-alive pool) and gRPC's internal sockets are not counted:
    they are not what a local client holds open.
    """
    if tcp_port is None:
        wanted = _socket_inodes(pid, "unix", paths=unix_paths)
    else:
        wanted = _socket_inodes(pid, "tcp", tcp_port) | _socket_inodes(pid, "tcp6", tcp_port)
    count = 0
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(entry.readlink())
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in wanted:
            count += 1
    return count


class Sampler:
    """Polls the RSS of `pids` every 20 ms; `peak` is the largest sum seen."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss_mib(pid) for pid in self.pids))
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Served:
    def __init__(self, root: Path, daemon: HwDaemon, rest: subprocess.Popen[bytes], rest_port: int) -> None:
        self.root = root
        self.daemon = daemon
        self.rest = rest
        self.rest_port = rest_port
        self.grpc_socket = daemon.socket
        self.aa_socket = str(root / "t" / "aa.sock")
        self.cdh_socket = str(root / "t" / "cdh.sock")

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    @property
    def rest_pid(self) -> int:
        return self.rest.pid

    def client_fds(self) -> dict[str, int]:
        """Descriptors held for local clients: the daemon's unix sockets, api-server-rest's TCP connections."""
        paths = frozenset({self.grpc_socket, self.aa_socket, self.cdh_socket})
        return {
            "daemon": client_fds(self.pid, unix_paths=paths),
            "rest": client_fds(self.rest_pid, tcp_port=self.rest_port),
        }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def serve_everything(root: Path) -> Iterator[Served]:
    """Dev KBS (with a 3 MiB resource and a KEK), the daemon on every transport, and api-server-rest."""
    resources = root / "resources"
    for repo_type, tag, data in (
        ("default/key", "1", b"a small secret"),
        ("default/big", "1", os.urandom(BIG_RESOURCE)),
        ("default/kek", "1", KEK),
    ):
        (resources / repo_type).mkdir(parents=True, exist_ok=True)
        (resources / repo_type / tag).write_bytes(data)
    with DevKbsServer(resources) as kbs:
        daemon = HwDaemon(
            root, "--tee", "sample", "--kbs-url", kbs.url, "--log-level", "warning",
            "--ttrpc-aa-socket", str(root / "t" / "aa.sock"), "--ttrpc-cdh-socket", str(root / "t" / "cdh.sock"),
        )  # fmt: skip
        rest: subprocess.Popen[bytes] | None = None
        try:
            daemon.wait_ready()
            port = _free_port()
            rest_log = (root / "rest.log").open("wb")
            rest = subprocess.Popen(
                [str(Path(sys.executable).parent / "api-server-rest"), "-b", f"127.0.0.1:{port}", "-f", "all",
                 "-a", f"unix://{root / 't' / 'aa.sock'}", "-c", f"unix://{root / 't' / 'cdh.sock'}",
                 "--log-level", "warning"],
                stdout=rest_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            rest_log.close()
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield Served(root, daemon, rest, port)
        finally:
            if rest is not None:
                rest.send_signal(signal.SIGTERM)
                rest.wait(20)
            daemon.stop()
