"""HTTP(S) front of the development KBS (stdlib `http.server`). Edge (network). Not needed in a guest."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import structlog

from cvm_tools.devkbs.core import MAX_BODY, DevKbsCore

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
        response = self.server.core.handle(self.command, self.path, headers, body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)
        log.info("devkbs.request", method=self.command, path=self.path.partition("?")[0], status=response.status)

    do_GET = _serve  # noqa: N815 - http.server's naming
    do_POST = _serve  # noqa: N815
    do_DELETE = _serve  # noqa: N815
    do_PUT = _serve  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:
        """Silence the default stderr access log; `_serve` logs through structlog."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], core: DevKbsCore) -> None:
        self.core = core
        super().__init__(address, _Handler)


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
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> DevKbsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
