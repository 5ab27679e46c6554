"""Run one entry point in this process, answer its first call, stop it, and print the modules it imported.

    python -m tests.startup_probe OUT.json SOCKET KIND -- ENTRYPOINT ARGS...

ENTRYPOINT is `cvm-agent`, `attestation-agent`, `confidential-data-hub` or `api-server-rest`; KIND is how to make
the first call on SOCKET (`grpc`: GetTeeType over gRPC, `ttrpc-aa`: GetTeeType over ttRPC, `ttrpc-cdh`: a ttRPC
call to the data hub's GetResource service with an empty request, `rest`: `GET /info` over HTTP on SOCKET =
HOST:PORT).
The entry point's `main` runs in the main thread exactly as its console script does; a second thread waits for
the socket, makes the call, then sends SIGTERM. OUT.json gets `{"modules": [...], "answered": bool}` as the
process exits, so everything the process imported during start-up, its first call and its stop is listed.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ENTRY_POINTS: dict[str, Callable[[], Callable[[list[str]], int]]] = {
    "cvm-agent": lambda: __import__("agent.cli", fromlist=["main"]).main,
    "attestation-agent": lambda: __import__("agent.compat.aa", fromlist=["main"]).main,
    "confidential-data-hub": lambda: __import__("agent.compat.cdh", fromlist=["main"]).main,
    "api-server-rest": lambda: __import__("agent.compat.rest", fromlist=["main"]).main,
}
WAIT_S = 60.0
LINGER_ENV = "STARTUP_PROBE_LINGER_S"  # stay up this long after the first answer (what the process loads while idle)


def _ttrpc_frame(service: str, method: str) -> bytes:
    """A ttRPC Request frame (stream 1) with an empty payload, written by hand so that the probe itself imports
    no protobuf or agent module."""

    def field(number: int, value: bytes) -> bytes:
        return bytes([(number << 3) | 2, len(value)]) + value

    body = field(1, service.encode()) + field(2, method.encode()) + field(3, b"")
    return len(body).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([1, 0]) + body


def _call(kind: str, path: str) -> bool:
    if kind == "grpc":
        import grpc

        with grpc.insecure_channel(f"unix:{path}") as channel:
            call = channel.unary_unary(
                "/attestation_agent.AttestationAgentService/GetTeeType",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            try:
                call(b"", timeout=30)
            except grpc.RpcError:
                return False
        return True
    if kind == "rest":
        host, _, port = path.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 ")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        service, method = {
            "ttrpc-aa": ("attestation_agent.AttestationAgentService", "GetTeeType"),
            "ttrpc-cdh": ("api.GetResourceService", "GetResource"),
        }[kind]
        sock.sendall(_ttrpc_frame(service, method))
        header = sock.recv(10)
        return len(header) == 10 and header[8] == 2  # a Response frame


def main() -> int:
    out, sock_path, kind, sep, entry, *args = sys.argv[1:]
    assert sep == "--", "usage: OUT SOCKET KIND -- ENTRYPOINT ARGS..."
    answered = threading.Event()

    def report() -> None:
        Path(out).write_text(json.dumps({"modules": sorted(sys.modules), "answered": answered.is_set()}))

    atexit.register(report)

    def caller() -> None:
        deadline = time.monotonic() + WAIT_S
        try:
            while time.monotonic() < deadline:
                try:
                    if _call(kind, sock_path):
                        answered.set()
                        time.sleep(float(os.environ.get(LINGER_ENV, "0")))
                        break
                except OSError:
                    pass
                time.sleep(0.01)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=caller, daemon=True).start()
    sys.argv = [entry, *args]
    return ENTRY_POINTS[entry]()(args)


if __name__ == "__main__":
    raise SystemExit(main())
