"""The real gRPC server on a unix socket, attesting to the real dev KBS over HTTP on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from cvm_tools.devkbs.server import DevKbsServer

from agent import log as agent_log
from agent.api._gen import api_pb2
from agent.api._gen import attestation_agent_pb2 as aa
from agent.kbs.jwe import KeyAlgorithm, TeeKeyPair, decrypt
from tests.integration.conftest import SECRET, RunningAgent, TlsFiles, start_agent, stop_agent

AA = "/attestation_agent.AttestationAgentService/"
GET_RESOURCE = "/api.GetResourceService/GetResource"

pytestmark = pytest.mark.integration


async def get_resource(agent: RunningAgent, uri: str) -> bytes:
    reply = await agent.call(GET_RESOURCE, api_pb2.GetResourceRequest(ResourcePath=uri), api_pb2.GetResourceResponse)
    data: bytes = reply.Resource
    return data


class TestAttestationAgentService:
    async def test_tee_type(self, agent: RunningAgent) -> None:
        reply = await agent.call(AA + "GetTeeType", aa.GetTeeTypeRequest(), aa.GetTeeTypeResponse)
        assert reply.tee == "sample"

    async def test_evidence_uses_runtime_data_verbatim(self, agent: RunningAgent) -> None:
        runtime = bytes(range(100))
        reply = await agent.call(AA + "GetEvidence", aa.GetEvidenceRequest(RuntimeData=runtime), aa.GetEvidenceResponse)
        assert reply.Evidence == b'{"svn":"1","report_data":"' + base64.b64encode(runtime) + b'"}'

    async def test_raw_wire_bytes(self, agent: RunningAgent) -> None:
        # An independent client: field 1, wire type 2 (0x0a), length 3, "abc"; reply decoded by hand.
        reply = await agent.raw(AA + "GetEvidence", b"\x0a\x03abc")
        assert reply[0] == 0x0A
        evidence = reply[2:] if reply[1] < 0x80 else reply[3:]
        assert json.loads(evidence) == {"svn": "1", "report_data": "YWJj"}
        assert await agent.raw(AA + "GetTeeType", b"") == b"\x0a\x06sample"

    async def test_additional_tees_and_evidence_empty(self, agent: RunningAgent) -> None:
        tees = await agent.call(AA + "GetAdditionalTees", aa.GetAdditionalTeesRequest(), aa.GetAdditionalTeesResponse)
        assert list(tees.additional_tees) == []
        extra = await agent.call(
            AA + "GetAdditionalEvidence", aa.GetAdditionalEvidenceRequest(RuntimeData=b"x"), aa.GetEvidenceResponse
        )
        assert extra.Evidence == b""

    async def test_extend_runtime_measurement_not_enabled(self, agent: RunningAgent) -> None:
        reply = await agent.call(
            AA + "ExtendRuntimeMeasurement",
            aa.ExtendRuntimeMeasurementRequest(Domain="d", Operation="o", Content="c"),
            aa.ExtendRuntimeMeasurementResponse,
        )
        assert reply.Result == aa.NOT_ENABLED

    async def test_bind_init_data_unsupported_on_sample(self, agent: RunningAgent) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent.call(AA + "BindInitData", aa.BindInitDataRequest(Digest=b"\x01" * 32), aa.BindInitDataResponse)
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "sample TEE has no initdata binding" in (info.value.details() or "")

    async def test_get_token_kbs(self, agent: RunningAgent, dev_kbs: DevKbsServer) -> None:
        reply = await agent.call(AA + "GetToken", aa.GetTokenRequest(TokenType="kbs"), aa.GetTokenResponse)
        payload = json.loads(reply.Token)
        assert set(payload) == {"token", "tee_keypair"}
        assert payload["tee_keypair"].startswith("-----BEGIN PRIVATE KEY-----")
        claims = dev_kbs.core.verify_token(payload["token"])
        assert claims is not None
        pubkey = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["runtime_data_claims"]["tee-pubkey"]
        # the pair works in passport mode: a JWE to the token's key decrypts with the returned private key
        from agent.kbs.jwe import encrypt

        keypair = TeeKeyPair.from_pem(payload["tee_keypair"].encode())
        assert keypair.public_jwk() == pubkey
        assert decrypt(keypair, encrypt(pubkey, b"passport")) == b"passport"

    async def test_unknown_token_type(self, agent: RunningAgent) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent.call(AA + "GetToken", aa.GetTokenRequest(TokenType="bogus"), aa.GetTokenResponse)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


class TestGetResource:
    @pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=[a.value for a in KeyAlgorithm])
    async def test_each_key_algorithm(self, tmp_path: Path, dev_kbs: DevKbsServer, algorithm: KeyAlgorithm) -> None:
        agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url, algorithm=algorithm)
        try:
            assert await get_resource(agent, "kbs:///default/key/1") == SECRET
            assert await get_resource(agent, "kbs://ignored.host:1234/default/key/1") == SECRET
        finally:
            await stop_agent(agent)
        assert dev_kbs.core.counters["auth"] == 1  # the second fetch reused the session

    @pytest.mark.parametrize("uri", ["kbs:///default/../1", "kbs:///default/key", "file:///etc/passwd", ""])
    async def test_malformed_uri_rejected_before_network(
        self, agent: RunningAgent, dev_kbs: DevKbsServer, uri: str
    ) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get_resource(agent, uri)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert dev_kbs.core.counters == {"auth": 0, "attest": 0, "resource": 0, "rejected": 0}

    async def test_missing_resource_reports_kbs_error(self, agent: RunningAgent, dev_kbs: DevKbsServer) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await get_resource(agent, "kbs:///default/key/none")
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert info.value.details() == (
            "KBS resource default/key/none failed with HTTP 401: PluginInternalError: Plugin internal error"
            " (the resource may not exist, or the KBS resource policy refused it)"
        )
        assert dev_kbs.core.counters["auth"] == 1  # a new token cannot cure it: no second handshake

    async def test_concurrent_cold_calls_share_one_handshake(self, agent: RunningAgent, dev_kbs: DevKbsServer) -> None:
        results = await asyncio.gather(*(get_resource(agent, "kbs:///default/key/1") for _ in range(25)))
        assert results == [SECRET] * 25
        assert dev_kbs.core.counters["auth"] == 1
        assert dev_kbs.core.counters["attest"] == 1
        assert agent.kbs.handshakes == 1

    async def test_expired_kbs_session_recovers_with_one_handshake(
        self, agent: RunningAgent, dev_kbs: DevKbsServer
    ) -> None:
        assert await get_resource(agent, "kbs:///default/key/1") == SECRET
        real_clock = dev_kbs.core.clock
        dev_kbs.core.clock = lambda: real_clock() + 3600  # the KBS forgets the session and rejects the token
        assert await get_resource(agent, "kbs:///default/key/1") == SECRET
        assert dev_kbs.core.counters["auth"] == 2
        assert agent.kbs.handshakes == 2

    async def test_token_refreshed_before_exp(self, tmp_path: Path, dev_kbs: DevKbsServer) -> None:
        now = [1_000_000.0]
        dev_kbs.core.clock = lambda: now[0]
        agent = await start_agent(
            str(tmp_path / "a.sock"), dev_kbs.url, clock=lambda: now[0], token_refresh_margin_s=30
        )
        try:
            await get_resource(agent, "kbs:///default/key/1")
            now[0] += 5 * 60 - 29  # inside the refresh margin of the 5-minute token, session still alive
            await get_resource(agent, "kbs:///default/key/1")
        finally:
            await stop_agent(agent)
        assert dev_kbs.core.counters["auth"] == 2
        assert dev_kbs.core.counters["rejected"] == 0

    async def test_https_with_custom_ca(self, tmp_path: Path, resources: Path, tls_files: TlsFiles) -> None:
        with DevKbsServer(resources, tls_cert=str(tls_files.cert), tls_key=str(tls_files.key)) as kbs:
            agent = await start_agent(str(tmp_path / "a.sock"), kbs.url, cert_path=str(tls_files.ca))
            try:
                assert await get_resource(agent, "kbs:///default/key/1") == SECRET
            finally:
                await stop_agent(agent)
            untrusting = await start_agent(str(tmp_path / "b.sock"), kbs.url)
            try:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await get_resource(untrusting, "kbs:///default/key/1")
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "CERTIFICATE_VERIFY_FAILED" in (info.value.details() or "")
            finally:
                await stop_agent(untrusting)

    async def test_response_size_cap(self, tmp_path: Path, resources: Path, dev_kbs: DevKbsServer) -> None:
        (resources / "default" / "key" / "big").write_bytes(b"x" * 100_000)
        agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url, max_response_bytes=50_000)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get_resource(agent, "kbs:///default/key/big")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "exceeds 50000 bytes" in (info.value.details() or "")
        finally:
            await stop_agent(agent)

    async def test_kbs_unreachable(self, tmp_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        agent = await start_agent(str(tmp_path / "a.sock"), f"http://127.0.0.1:{port}", sleep=_no_sleep)
        try:
            results = await asyncio.gather(
                *(get_resource(agent, "kbs:///default/key/1") for _ in range(10)), return_exceptions=True
            )
            for result in results:
                assert isinstance(result, grpc.aio.AioRpcError)
                assert result.code() is grpc.StatusCode.UNAVAILABLE
                assert "unreachable" in (result.details() or "")
            # how many of the ten overlapped depends on scheduling (sharing is unit-tested); each call made at most one
            before = agent.kbs.handshakes
            assert 1 <= before <= 10
            # a failed handshake is not cached: the next caller tries again, exactly once
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get_resource(agent, "kbs:///default/key/1")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert agent.kbs.handshakes == before + 1
        finally:
            await stop_agent(agent)

    async def test_kbs_that_never_answers_times_out(self, tmp_path: Path, silent_server: int) -> None:
        agent = await start_agent(str(tmp_path / "a.sock"), f"http://127.0.0.1:{silent_server}", timeout_s=0.5)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get_resource(agent, "kbs:///default/key/1")
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == (
                f"KBS at http://127.0.0.1:{silent_server} did not answer POST /kbs/v0/auth within 0.5 s (kbs.timeout_s)"
            )
        finally:
            await stop_agent(agent)


async def _no_sleep(_seconds: float) -> None:
    return None


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


class TestSockets:
    async def test_socket_and_directory_are_private(self, agent: RunningAgent) -> None:
        mode = Path(agent.socket).stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(Path(agent.socket).parent.stat().st_mode) == 0o700

    async def test_stale_socket_replaced(self, tmp_path: Path, dev_kbs: DevKbsServer) -> None:
        path = tmp_path / "stale.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # the file stays, nobody listens
        agent = await start_agent(str(path), dev_kbs.url)
        try:
            reply = await agent.call(AA + "GetTeeType", aa.GetTeeTypeRequest(), aa.GetTeeTypeResponse)
            assert reply.tee == "sample"
        finally:
            await stop_agent(agent)
        assert not path.exists()

    async def test_live_socket_not_stolen(self, agent: RunningAgent, dev_kbs: DevKbsServer) -> None:
        from agent.errors import ConfigError

        with pytest.raises(ConfigError, match="in use by another running process"):
            await start_agent(agent.socket, dev_kbs.url)

    async def test_regular_file_not_replaced(self, tmp_path: Path, dev_kbs: DevKbsServer) -> None:
        from agent.errors import ConfigError

        path = tmp_path / "file"
        path.write_text("keep me")
        with pytest.raises(ConfigError, match="is not a socket"):
            await start_agent(str(path), dev_kbs.url)
        assert path.read_text() == "keep me"


async def test_secrets_never_reach_logs_or_errors(tmp_path: Path, dev_kbs: DevKbsServer) -> None:
    stream = io.StringIO()
    agent_log.configure("debug", "json", stream=stream)
    try:
        agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url)
        try:
            assert await get_resource(agent, "kbs:///default/key/1") == SECRET
            token_reply = await agent.call(AA + "GetToken", aa.GetTokenRequest(TokenType="kbs"), aa.GetTokenResponse)
            with pytest.raises(grpc.aio.AioRpcError):
                await get_resource(agent, "kbs:///default/key/missing")
        finally:
            await stop_agent(agent)
    finally:
        structlog.reset_defaults()
    logs = stream.getvalue()
    token = json.loads(token_reply.Token)
    assert '"event": "rpc"' in logs
    assert '"event": "kbs.exchange"' in logs
    for line in logs.splitlines():
        json.loads(line)  # one JSON object per line
    for needle in (
        SECRET.decode("latin-1"),
        base64.b64encode(SECRET).decode(),
        token["token"],
        token["token"].split(".")[2],
        "PRIVATE KEY",
        token["tee_keypair"].splitlines()[1],
    ):
        assert needle not in logs
