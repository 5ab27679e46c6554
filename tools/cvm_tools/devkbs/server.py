"""HTTP(S) front of the development KBS (stdlib `http.server`). Edge (network). Not needed in a guest."""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import socket
import ssl
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import structlog

from cvm_tools.devkbs.core import ERROR_PREFIX, MAX_BODY, DevKbsCore, Response
from cvm_tools.devkbs.faults import JWE_KINDS, TRANSPORT_KINDS, Fault, mutate_jwe

__all__ = ["DevKbsServer"]

log = structlog.get_logger("cvm_tools.devkbs")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # one write per response: avoids Nagle/delayed-ACK stalls on loopback

    def _serve(self) -> None:
        length_text = self.headers.get("Content-Length", "0")
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.send_response(413)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        route = self.path.partition("?")[0]
        step = route.removeprefix("/kbs/v0/").split("/")[0]
        fault = self.server.core.faults.take(step, TRANSPORT_KINDS)
        if fault is not None and fault.kind == "reset":
            self._reset()
            log.info("devkbs.request", method=self.command, path=route, fault="reset")
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(float(fault.arg or 1.0))
        response = self.server.core.handle(self.command, self.path, headers, body)
        jwe_fault = self.server.core.faults.take(step, JWE_KINDS) if response.status == 200 else None
        if jwe_fault is not None:
            with contextlib.suppress(ValueError):  # a kind that does not apply to this key leaves the body alone
                response.body = mutate_jwe(response.body, jwe_fault.kind)
        if fault is not None:
            response = _faulty(fault, response)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        try:
            if fault is not None and fault.kind == "drip":
                self._drip(response.body, float(fault.arg or 1.0))
            else:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        log.info("devkbs.request", method=self.command, path=route, status=response.status, fault=fault and fault.kind)

    def _reset(self) -> None:
        """Close the connection with a TCP RST, answering nothing."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _drip(self, body: bytes, interval_s: float) -> None:
        self.wfile.flush()
        for index in range(len(body)):
            self.connection.sendall(body[index : index + 1])
            time.sleep(interval_s)

    do_GET = _serve  # noqa: N815 - http.server's naming
    do_POST = _serve  # noqa: N815
    do_DELETE = _serve  # noqa: N815
    do_PUT = _serve  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log; `_serve` logs through structlog."""


def _faulty(fault: Fault, response: Response) -> Response:
    """The response as the transport fault makes it (`slow`, `drip` and `reset` are applied by the handler)."""
    json_headers = {"Content-Type": "application/json"}
    if fault.kind == "status":
        status = int(fault.arg or 500)
        detail = json.dumps({"type": ERROR_PREFIX + "InternalError", "detail": f"injected HTTP {status}"})
        return Response(status, detail.encode(), json_headers)
    if fault.kind == "garbage":
        return Response(200, b"\x00\xffnot json{", json_headers)
    if fault.kind == "truncated":
        return Response(response.status, response.body[: len(response.body) // 2], response.headers)
    if fault.kind == "nested":
        depth = int(fault.arg or 100_000)
        return Response(200, b'{"nonce":' + b"[" * depth + b"]" * depth + b"}", json_headers)
    if fault.kind == "oversized":
        return Response(200, b"{}" + b" " * int(float(fault.arg or 32) * 1024 * 1024), json_headers)
    if fault.kind == "gzip":  # two gzip members: the real body, then MiB of spaces (valid JSON once decoded)
        bomb = gzip.compress(response.body) + _spaces_gzip(int(float(fault.arg or 64)))
        return Response(response.status, bomb, {**response.headers, "Content-Encoding": "gzip"})
    return response


@functools.cache
def _spaces_gzip(mebibytes: int) -> bytes:
    return gzip.compress(b" " * (mebibytes * 1024 * 1024), 9)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver.py default 5: a fleet connecting at once would wait for SYN retries

    def __init__(self, address: tuple[str, int], core: DevKbsCore) -> None:
        self.core = core
        self.connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, object]:
        connection, address = super().get_request()
        with self._connections_lock:
            self.connections.add(connection)
        return connection, address

    def shutdown_request(self, request: object) -> None:
        with self._connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)  # type: ignore[arg-type]

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up (as the agent does on a fault) is not an error worth a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.info("devkbs.client_gone", error=type(error).__name__)
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]

    def drop_connections(self) -> None:
        """What a killed process does to its open connections: they end, kept-alive ones included."""
        with self._connections_lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self.connections.clear()


class DevKbsServer:
    """Runs the development KBS in a background thread (tests, `make demo`) or in the foreground (CLI)."""

    def __init__(
        self,
        resources: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        session_minutes: float = 5.0,
        token_minutes: float = 5.0,
        admin_public_key: bytes | None = None,
        insecure_admin: bool = False,
    ) -> None:
        self.core = DevKbsCore(
            resources,
            session_minutes=session_minutes,
            token_minutes=token_minutes,
            admin_public_key=admin_public_key,
            insecure_admin=insecure_admin,
        )
        self._server = _Server((host, port), self.core)
        self.scheme = "http"
        if tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_cert, tls_key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._server.server_address[0])
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> DevKbsServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="dev-kbs", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def shutdown(self) -> None:
        """Make `serve_forever` return (call from another thread)."""
        self._server.shutdown()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> DevKbsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
