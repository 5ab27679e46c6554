"""The KBS client's HTTP/1.1 pool against scripted servers on loopback: exact request bytes, every body framing,
keep-alive and its limits, and what a KBS that lies, drips, closes or floods gets."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.kbs.http import (
    ConnectError,
    HttpError,
    HttpResponse,
    Origin,
    Pool,
    ReadError,
    RemoteProtocolError,
    ResponseTooLarge,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Server:
    """A loopback server running `script` for every connection; records the requests' bytes and connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.received = bytearray()
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.script(_Recording(reader, self), writer)  # type: ignore[arg-type]
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


class _Recording:
    def __init__(self, reader: asyncio.StreamReader, server: Server) -> None:
        self._reader = reader
        self._server = server

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        data = await self._reader.readuntil(separator)
        self._server.received += data
        return data

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self._server.received += data
        return data

    async def read(self, n: int = -1) -> bytes:
        data = await self._reader.read(n)
        self._server.received += data
        return data


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (Content-Length framing, as the client sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + (await reader.readexactly(length) if length else b"")


def answering(*answers: bytes, then_close: bool = False) -> Script:
    """Reads a request and writes the next answer, for as many requests as there are answers on the connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await reader.read()  # until the client closes

    return script


@asynccontextmanager
async def serving(script: Script, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(script)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def pool_for(server: Server, **options: object) -> Pool:
    origin = Origin("http", "127.0.0.1", server.port, "")
    return Pool(origin, **options)  # type: ignore[arg-type]


async def get(pool: Pool, path: str = "/kbs/v0/resource/a/b/c", *, max_bytes: int = 1 << 20) -> HttpResponse:
    return await pool.send("GET", path, {}, None, max_bytes=max_bytes)


# --- the request on the wire (known answer) ---


async def test_post_and_get_bytes_on_the_wire() -> None:
    async with serving(answering(OK, OK)) as server:
        pool = Pool(Origin("http", "127.0.0.1", server.port, "/prefix"))
        body = b'{"version":"0.4.0","tee":"sample","extra-params":""}'
        fixed = {"User-Agent": "cvm-agent/0.1.0", "Accept-Encoding": "identity"}
        post = {**fixed, "Content-Type": "application/json"}
        await pool.send("POST", "/kbs/v0/auth", post, body, max_bytes=100)
        get_ = {**fixed, "Cookie": "kbs-session-id=ab"}
        await pool.send("GET", "/kbs/v0/resource/default/key/1", get_, None, max_bytes=100)
        await pool.aclose()
    host = f"127.0.0.1:{server.port}".encode()
    assert bytes(server.received) == (
        b"POST /prefix/kbs/v0/auth HTTP/1.1\r\n"
        b"Host: " + host + b"\r\n"
        b"User-Agent: cvm-agent/0.1.0\r\n"
        b"Accept-Encoding: identity\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 52\r\n"
        b"\r\n" + body + b"GET /prefix/kbs/v0/resource/default/key/1 HTTP/1.1\r\n"
        b"Host: " + host + b"\r\n"
        b"User-Agent: cvm-agent/0.1.0\r\n"
        b"Accept-Encoding: identity\r\n"
        b"Cookie: kbs-session-id=ab\r\n"
        b"\r\n"
    )
    assert server.connections == 1  # kept alive


def test_origin_parsing() -> None:
    assert Origin.parse("http://kbs:8080/") == Origin("http", "kbs", 8080, "")
    assert Origin.parse("https://kbs.example/trustee") == Origin("https", "kbs.example", 443, "/trustee")
    assert Origin.parse("http://kbs").port == 80
    assert Origin.parse("https://[fd00::1]:8443").host_header == "[fd00::1]:8443"
    assert Origin.parse("https://[fd00::1]").host_header == "[fd00::1]"
    assert Origin.parse("http://10.0.0.1:80").host_header == "10.0.0.1"
    assert Origin.parse("https://kbs:443").host_header == "kbs"
    for bad, reason in [
        ("ftp://kbs", "scheme is 'ftp', expected http or https"),
        ("http://", "has no host"),
        ("http://user:pw@kbs", "carries user:password"),
        ("http://kbs/?a=b", "has a query or fragment"),
        ("http://kbs:99999", "is not a URL"),
    ]:
        with pytest.raises(ValueError, match=reason) as info:
            Origin.parse(bad)
        assert "pw" not in str(info.value)


def test_response_headers_and_repr() -> None:
    response = HttpResponse(200, (("set-cookie", "a=1"), ("x", "y"), ("set-cookie", "b=2")), b"secret")
    assert response.header_list("Set-Cookie") == ["a=1", "b=2"]
    assert response.header("X") == "y"
    assert response.header("missing") is None
    assert repr(response) == "HttpResponse(200, 6 bytes)"


# --- answers in every framing ---


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;ext=1\r\nllo\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["content-length", "chunked with extension and trailer", "after 100 Continue"],
)
async def test_bodies(answer: bytes) -> None:
    async with serving(answering(answer, OK)) as server:
        pool = pool_for(server)
        response = await get(pool)
        assert (response.status, response.body) == (200, b"hello")
        assert (await get(pool)).body == b"ok"
        await pool.aclose()
    assert server.connections == 1


async def test_body_until_close() -> None:
    answer = b"HTTP/1.0 200 OK\r\n\r\nuntil the end"
    async with serving(answering(answer, then_close=True)) as server:
        pool = pool_for(server)
        assert (await get(pool)).body == b"until the end"
        assert (await get(pool)).body == b"until the end"
        await pool.aclose()
    assert server.connections == 2  # a body that ends with the connection cannot be followed by another


async def test_connection_close_is_honoured() -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with serving(answering(answer, then_close=True)) as server:
        pool = pool_for(server)
        await get(pool)
        await get(pool)
        await pool.aclose()
    assert server.connections == 2


async def test_repeated_headers_kept_in_order() -> None:
    answer = b"HTTP/1.1 401 Unauthorized\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"
    async with serving(answering(answer)) as server:
        pool = pool_for(server)
        response = await get(pool)
        await pool.aclose()
    assert response.status == 401
    assert response.header_list("set-cookie") == ["a=1", "b=2"]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12))
def test_any_body_any_chunking_any_segmentation(body: bytes, cuts: list[int]) -> None:
    """A chunked answer cut into arbitrary chunks and written in arbitrary TCP segments reads back whole."""
    chunks, rest = [], body
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        offset = 0
        for cut in [*cuts, len(wire)]:
            writer.write(wire[offset : offset + cut])
            await writer.drain()
            offset += cut
        writer.write(wire[offset:])
        await reader.read()

    async def run() -> bytes:
        async with serving(script) as server:
            pool = pool_for(server)
            try:
                return (await get(pool, max_bytes=4000)).body
            finally:
                await pool.aclose()

    assert asyncio.run(run()) == body


# --- keep-alive ---


async def test_idle_connection_reused_only_within_keepalive() -> None:
    now = [100.0]
    async with serving(answering(OK, OK, OK)) as server:
        pool = pool_for(server, keepalive_s=4.0, clock=lambda: now[0])
        await get(pool)
        now[0] += 3.9
        await get(pool)
        assert server.connections == 1
        now[0] += 4.0
        await get(pool)
        await pool.aclose()
    assert server.connections == 2


async def test_connection_closed_by_the_kbs_while_idle_is_not_used() -> None:
    async with serving(answering(OK, then_close=True)) as server:
        pool = pool_for(server)
        await get(pool)
        await asyncio.sleep(0.05)  # the close arrives
        assert (await get(pool)).body == b"ok"
        await pool.aclose()
    assert server.connections == 2


async def test_kept_alive_connection_closed_as_the_request_goes_out_is_retried_once() -> None:
    """The race of every keep-alive client: the KBS reads the next request but closes without an answer."""
    first = [True]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if first[0]:
            first[0] = False
            await read_request(reader)
            writer.write(OK)
            await writer.drain()
            await read_request(reader)
            return  # closed without answering
        await answering(OK)(reader, writer)

    async with serving(script) as server:
        pool = pool_for(server)
        await get(pool)
        assert (await get(pool)).body == b"ok"
        await pool.aclose()
    assert server.connections == 2


async def test_new_connection_closed_without_answer_is_the_callers_to_retry() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(script) as server:
        pool = pool_for(server)
        with pytest.raises(RemoteProtocolError) as info:
            await get(pool)
        await pool.aclose()
    assert info.value.retryable
    assert not info.value.answered
    assert server.connections == 1


async def test_at_most_max_connections_at_once() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

    async with serving(script) as server:
        pool = pool_for(server, max_connections=2, max_idle=1)
        calls = [asyncio.create_task(get(pool)) for _ in range(5)]
        await asyncio.sleep(0.1)
        assert server.open == 2
        release.set()
        assert [r.body for r in await asyncio.gather(*calls)] == [b"ok"] * 5
        await pool.aclose()
    assert server.most_open == 2


async def test_cancelled_exchange_never_reuses_its_connection() -> None:
    stalled = [True]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if stalled[0]:
            stalled[0] = False
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await writer.drain()
            await reader.read()
            return
        writer.write(OK)
        await reader.read()

    async with serving(script) as server:
        pool = pool_for(server)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await get(pool)
        assert (await get(pool)).body == b"ok"  # not the rest of the stalled answer
        await pool.aclose()
    assert server.connections == 2


async def test_closed_pool_refuses() -> None:
    async with serving(answering(OK)) as server:
        pool = pool_for(server)
        await pool.aclose()
        with pytest.raises(ConnectError, match="closed") as info:
            await get(pool)
    assert not info.value.retryable


# --- a KBS that lies, floods or breaks ---


@pytest.mark.parametrize(
    ("answer", "max_bytes"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000, 1000),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"10\r\n" + b"x" * 16 + b"\r\n" * 100, 1000),
        (b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 5000, 1000),
    ],
    ids=["content-length", "chunked", "until close"],
)
async def test_body_over_the_limit(answer: bytes, max_bytes: int) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if b"chunked" in answer:
            writer.write(answer.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
            for _ in range(200):
                writer.write(b"10\r\n" + b"x" * 16 + b"\r\n")
        else:
            writer.write(answer)
        await writer.drain()
        await reader.read()

    async with serving(script) as server:
        pool = pool_for(server)
        with pytest.raises(ResponseTooLarge) as info:
            await get(pool, max_bytes=max_bytes)
        await pool.aclose()
    assert info.value.answered
    assert str(info.value) == f"the response exceeds {max_bytes} bytes"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HELLO\r\n\r\n", "illegal status line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200_000 + b"\r\n\r\n", "Receive buffer too long"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "peer closed connection"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nok", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + OK, "more than 8 informational"),
    ],
    ids=["garbage", "endless header", "truncated", "two lengths", "bad chunk size", "100 Continue flood"],
)
async def test_broken_answers(answer: bytes, message: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with serving(script) as server:
        pool = pool_for(server)
        with pytest.raises(RemoteProtocolError, match=message) as info:
            await get(pool)
        await pool.aclose()
    assert info.value.answered


async def test_error_text_quotes_little_of_the_answer() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX" + b"\x01" * 30_000 + b": y\r\n\r\n")
        await writer.drain()

    async with serving(script) as server:
        pool = pool_for(server)
        with pytest.raises(RemoteProtocolError) as info:
            await get(pool)
        await pool.aclose()
    assert len(str(info.value)) < 300


async def test_header_value_that_cannot_be_sent_is_not_quoted() -> None:
    async with serving(answering(OK)) as server:
        pool = pool_for(server)
        with pytest.raises(HttpError) as info:
            await pool.send(
                "GET", "/kbs/v0/resource/a/b/c", {"Cookie": "kbs-session-id=secret\r\nX: y"}, None, max_bytes=9
            )
        await pool.aclose()
    assert "secret" not in str(info.value)
    assert not info.value.retryable


async def test_reset_is_a_read_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.transport.abort()  # RST

    async with serving(script) as server:
        pool = pool_for(server)
        with pytest.raises((ReadError, RemoteProtocolError)) as info:
            await get(pool)
        await pool.aclose()
    assert info.value.retryable


async def test_refused_connection() -> None:
    async with serving(answering()) as server:
        port = server.port
    pool = Pool(Origin("http", "127.0.0.1", port, ""))
    with pytest.raises(ConnectError) as info:
        await get(pool)
    assert info.value.retryable


# --- TLS ---


def _certificates(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A CA and a server certificate for 127.0.0.1; returns the server context and the CA file."""
    now = datetime.datetime.now(datetime.UTC)

    def cert(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            import ipaddress

            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("test CA", ca_key, "test CA", ca_key, True)
    leaf = cert("kbs", server_key, "test CA", ca_key, False)
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return context, tmp_path / "ca.pem"


async def test_tls_verified_and_kept_alive(tmp_path: Path) -> None:
    server_context, ca = _certificates(tmp_path)
    async with serving(answering(OK, OK), tls=server_context) as server:
        client_context = ssl.create_default_context(cafile=str(ca))
        pool = Pool(Origin("https", "127.0.0.1", server.port, ""), ssl_context=client_context)
        assert (await get(pool)).body == b"ok"
        assert (await get(pool)).body == b"ok"
        await pool.aclose()
    assert server.connections == 1


async def test_tls_untrusted_certificate_is_not_retried(tmp_path: Path) -> None:
    server_context, _ = _certificates(tmp_path)
    async with serving(answering(OK), tls=server_context) as server:
        pool = Pool(Origin("https", "127.0.0.1", server.port, ""), ssl_context=ssl.create_default_context())
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED") as info:
            await get(pool)
        await pool.aclose()
    assert not info.value.retryable


def test_https_needs_a_context() -> None:
    with pytest.raises(ValueError, match="SSL context"):
        Pool(Origin("https", "kbs", 443, ""))
