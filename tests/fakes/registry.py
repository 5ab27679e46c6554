"""A real registry for tests: Debian's `docker-registry` (CNCF distribution) on loopback, plus what tests need
around it: OCI images built in Python and pushed through the HTTP API, htpasswd and token auth, and a flaky
proxy that injects resets, 5xx, truncation and corrupted bytes.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cvm_tools.sign import encode_compact

REGISTRY_BINARY = "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- images ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar entry: a file (`data`), a directory, a symlink or hardlink (`target`)."""

    name: str
    data: bytes = b""
    kind: str = "file"  # file, dir, symlink, hardlink
    target: str = ""
    mode: int = 0o644


def tar_layer(entries: Sequence[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            info.mtime = 1_700_000_000
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = e.mode if e.mode != 0o644 else 0o755
                tar.addfile(info)
            elif e.kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if e.kind == "symlink" else tarfile.LNKTYPE
                info.linkname = e.target
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    return out.getvalue()


@dataclass
class Image:
    manifest: bytes
    config: bytes
    blobs: dict[str, bytes]
    layers: list[dict[str, Any]]
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


@dataclass
class Layer:
    blob: bytes
    media_type: str
    diff_id: str
    annotations: dict[str, str] = field(default_factory=dict)


def gzip_layer(tar: bytes) -> Layer:
    return Layer(gzip.compress(tar, compresslevel=1, mtime=0), LAYER_GZIP, sha256(tar))


def build_image(
    layers: Sequence[Layer], *, arch: str = "amd64", variant: str | None = None, config_extra: Mapping[str, Any] = {}
) -> Image:
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        **config_extra,
    }
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config).encode()
    descriptors = []
    blobs = {sha256(config_bytes): config_bytes}
    for layer in layers:
        d: dict[str, Any] = {"mediaType": layer.media_type, "digest": sha256(layer.blob), "size": len(layer.blob)}
        if layer.annotations:
            d["annotations"] = layer.annotations
        descriptors.append(d)
        blobs[sha256(layer.blob)] = layer.blob
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": descriptors,
    }
    return Image(json.dumps(manifest).encode(), config_bytes, blobs, descriptors)


def build_index(images: Sequence[tuple[Image, str, str | None]]) -> bytes:
    manifests = []
    for image, arch, variant in images:
        platform = {"os": "linux", "architecture": arch} | ({"variant": variant} if variant else {})
        manifests.append(
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": len(image.manifest), "platform": platform}
        )
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


class Pusher:
    """Pushes blobs and manifests through the distribution HTTP API (monolithic uploads)."""

    def __init__(self, base_url: str, *, auth: httpx.Auth | None = None, verify: Any = True) -> None:
        self.base = base_url.rstrip("/")
        self._http = httpx.Client(auth=auth, verify=verify, timeout=30)

    def close(self) -> None:
        self._http.close()

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self._http.head(f"{self.base}/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        start = self._http.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        location = start.headers["location"]
        if location.startswith("/"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        done = self._http.put(
            f"{location}{sep}digest={digest}", content=data, headers={"Content-Type": "application/octet-stream"}
        )
        assert done.status_code == 201, done.text
        return digest

    def manifest(self, repo: str, tag: str, body: bytes, media_type: str) -> str:
        response = self._http.put(
            f"{self.base}/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": media_type}
        )
        assert response.status_code == 201, response.text
        return sha256(body)

    def image(self, repo: str, tag: str, image: Image) -> str:
        for data in image.blobs.values():
            self.blob(repo, data)
        return self.manifest(repo, tag, image.manifest, image.media_type)


# -- htpasswd and token auth ----------------------------------------------------------------------------------


def bcrypt_hash(password: str) -> str:
    """bcrypt through libxcrypt (Python's `crypt` module is deprecated; the registry accepts `$2y$`)."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    salt = "".join(secrets.choice(alphabet) for _ in range(21)) + "u"
    result = lib.crypt(password.encode(), f"$2y$05${salt}".encode())
    assert result, "libcrypt has no bcrypt"
    assert result.startswith(b"$2y$"), "libcrypt has no bcrypt"
    return str(result.decode())


@dataclass
class TokenIssuer:
    """Signs registry tokens (ES256, `x5c` with a self-signed certificate the registry trusts)."""

    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    cert_der: bytes
    service: str = "cvm-test-registry"
    issuer: str = "cvm-test-token-server"

    @classmethod
    def create(cls) -> TokenIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER))

    def token(self, subject: str, repository: str, actions: list[str], ttl_s: int = 300) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + ttl_s,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": [{"type": "repository", "name": repository, "actions": actions}],
        }
        header = {"typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        return encode_compact(self.key, header, claims)


class TokenServer:
    """`GET /token?service=&scope=repository:<repo>:pull[,push]` with HTTP Basic; counts requests."""

    def __init__(self, issuer: TokenIssuer, users: Mapping[str, str]) -> None:
        self.issuer = issuer
        self.users = dict(users)
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if server.users.get(name) == password:
                        user = name
                server.requests.append({"query": query, "user": user})
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                scope = query.get("scope", [""])[0]
                _, repo, actions = scope.split(":") if scope.count(":") == 2 else ("", "", "")
                token = server.issuer.token(user, repo, actions.split(","))
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TokenServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the registry process --------------------------------------------------------------------------------------


class Registry:
    """`docker-registry serve` on 127.0.0.1 with a temp config; `auth` is None, ("htpasswd", path) or ("token", ...)."""

    def __init__(
        self, root: Path, *, auth: Mapping[str, Any] | None = None, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://{self.host}"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root / "storage")}, "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        if auth:
            config["auth"] = dict(auth)
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "config.yml"
        self.config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
        self._process: subprocess.Popen[bytes] | None = None
        self._log = root / "registry.log"

    def __enter__(self) -> Registry:
        log = self._log.open("wb")
        self._process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", "")},
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                msg = f"docker-registry exited: {self._log.read_text()[-2000:]}"
                raise RuntimeError(msg)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        msg = "docker-registry did not start listening"
        raise RuntimeError(msg)

    def __exit__(self, *_exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)


def registry_available() -> str | None:
    """None when the registry binary is present, else the reason to skip."""
    if shutil.which(REGISTRY_BINARY) is None and not Path(REGISTRY_BINARY).exists():
        return f"{REGISTRY_BINARY} not installed (Debian package docker-registry; tests/setup-host.sh installs it)"
    return None


# -- flaky proxy -----------------------------------------------------------------------------------------------


class FlakyProxy:
    """An HTTP/1.1 reverse proxy in front of a registry that injects faults.

    `faults` maps a path substring to a list of faults applied to successive matching requests:
    "reset" (close with RST after the head), "503", "500", "truncate" (half the body, then close), "corrupt" (one
    byte flipped, same length), "stall" (no answer for 30 s), "delay" (answer after 2 s). Requests after the
    list is used up pass through.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: dict[str, list[str]] = {}
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, path: str) -> str | None:
        with self._lock:
            for pattern, queue in self.faults.items():
                if pattern in path and queue:
                    fault = queue.pop(0)
                    self.seen.append((path, fault))
                    return fault
            self.seen.append((path, "pass"))
        return None

    def _handle(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        while True:
            request_line = reader.readline()
            if not request_line:
                return
            headers = []
            while True:
                line = reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                if not line.lower().startswith((b"connection:", b"keep-alive:")):
                    headers.append(line)
            parts = request_line.split(b" ")
            if len(parts) != 3:  # not HTTP (a TLS hello): drop the connection
                return
            path = parts[1].decode(errors="replace")
            fault = self._fault_for(path)
            if fault in ("503", "500"):
                client.sendall(f"HTTP/1.1 {fault} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
                return
            if fault == "stall":
                time.sleep(30)
                return
            if fault == "delay":
                time.sleep(2)
            length = next((int(h.split(b":", 1)[1]) for h in headers if h.lower().startswith(b"content-length:")), 0)
            head, body = self._forward(request_line, headers, reader.read(length) if length else b"")
            if fault == "reset":
                client.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
                )
                client.sendall(head)
                client.close()
                return
            if fault == "truncate":
                client.sendall(head + body[: len(body) // 2])
                return
            if fault == "corrupt" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            client.sendall(head + body)
            return

    def _forward(self, request_line: bytes, headers: list[bytes], request_body: bytes) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30) as upstream:
            host = f"Host: 127.0.0.1:{self.upstream_port}\r\n".encode()
            rest = [h for h in headers if not h.lower().startswith(b"host:")]
            upstream.sendall(request_line + host + b"".join(rest) + b"Connection: close\r\n\r\n" + request_body)
            data = b""
            while chunk := upstream.recv(1 << 16):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = [
            line for line in head.split(b"\r\n") if not line.lower().startswith((b"connection:", b"transfer-encoding:"))
        ]
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
            lines = [line for line in lines if not line.lower().startswith(b"content-length:")]
            lines.append(f"Content-Length: {len(body)}".encode())
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n", body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


@contextlib.contextmanager
def running(*managers: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield
