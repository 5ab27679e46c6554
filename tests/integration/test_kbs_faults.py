"""The KBS fault matrix: the real agent (gRPC) against the dev KBS misbehaving through its fault switches.

For every fault: the documented outcome (the call recovers, or fails with a specific status and message),
the agent keeps serving once the KBS behaves again, no traceback or crash line is logged, and neither the
secret nor a token appears in the logs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from agent import log as agent_log
from agent.api._gen import api_pb2
from agent.api._gen import attestation_agent_pb2 as aa
from tests.integration.conftest import SECRET, DevKbsServer, RunningAgent, TlsFiles, start_agent, stop_agent

pytestmark = pytest.mark.integration

GET_RESOURCE = "/api.GetResourceService/GetResource"
GET_TOKEN = "/attestation_agent.AttestationAgentService/GetToken"
RECOVERS = None
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class Fault:
    name: str
    step: str
    kind: str | None
    arg: float | str | None = None
    times: int = -1
    status: grpc.StatusCode | None = RECOVERS
    message: str = ""
    warm: bool = False  # attest once before the fault, so it hits an established session
    uri: str = "kbs:///default/key/1"
    options: dict[str, Any] = field(default_factory=dict)


MATRIX = [
    Fault("5xx on auth", "auth", "status", 500, status=UNAVAILABLE, message="auth failed with HTTP 500: InternalError"),
    Fault("503 on the first 2 auth", "auth", "status", 503, times=2),
    Fault("503 on every auth", "auth", "status", 503, status=UNAVAILABLE, message="auth failed with HTTP 503"),
    Fault(
        "5xx on resource",
        "resource",
        "status",
        502,
        status=UNAVAILABLE,
        message="default/key/1 failed with HTTP 502",
        warm=True,
    ),
    Fault("connection reset once", "auth", "reset", times=1),
    Fault("connection reset always", "resource", "reset", status=UNAVAILABLE, message="is unreachable", warm=True),
    Fault("slow answer within the deadline", "attest", "slow", 0.3, options={"timeout_s": 3.0}),
    Fault(
        "slow answer past the deadline",
        "auth",
        "slow",
        5.0,
        status=UNAVAILABLE,
        message="did not answer POST /kbs/v0/auth within 2 s",
    ),
    Fault(
        "dripping body", "auth", "drip", 0.05, status=UNAVAILABLE, message="did not answer POST /kbs/v0/auth within 2 s"
    ),
    Fault("garbage challenge", "auth", "garbage", status=UNAVAILABLE, message="KBS challenge is not UTF-8."),
    Fault(
        "truncated token response",
        "attest",
        "truncated",
        status=UNAVAILABLE,
        message="KBS attest response is not valid JSON.",
    ),
    Fault("nested JSON", "auth", "nested", 100_000, status=UNAVAILABLE, message="nested more than 64 levels deep"),
    Fault(
        "compressed body (gzip bomb)",
        "resource",
        "gzip",
        64,
        status=UNAVAILABLE,
        message="Content-Encoding 'gzip', expected identity",
        warm=True,
        options={"timeout_s": 30.0},  # the dev KBS compresses the 64 MiB bomb once, however loaded the machine is
    ),
    Fault(
        "oversized body",
        "resource",
        "oversized",
        2,
        status=UNAVAILABLE,
        message="exceeds 1048576 bytes",
        warm=True,
        options={"max_response_bytes": 1024 * 1024},
    ),
    Fault(
        "tampered JWE tag",
        "resource",
        "tamper-tag",
        status=UNAVAILABLE,
        message="cannot be decrypted with the agent's key",
    ),
    Fault(
        "tampered JWE ciphertext", "resource", "tamper-ciphertext", status=UNAVAILABLE, message="cannot be decrypted"
    ),
    Fault("tampered JWE header", "resource", "tamper-header", status=UNAVAILABLE, message="cannot be decrypted"),
    Fault("wrong epk curve", "resource", "epk-curve", status=UNAVAILABLE, message="cannot be decrypted"),
    Fault(
        "foreign tee-pubkey",
        "attest",
        "foreign-pubkey",
        status=UNAVAILABLE,
        message="tee-pubkey is another key, expected the agent's own key",
    ),
    Fault(
        "expired token", "attest", "expired-token", status=UNAVAILABLE, message="issued a token that is already expired"
    ),
    Fault(
        "version mismatch",
        "auth",
        "version",
        "0.2.0",
        status=DENIED,
        message="Protocol Version Mismatch: expect =0.2.0",
    ),
    Fault("policy deny", "resource", "deny", status=DENIED, message="PolicyDeny: Access denied by policy"),
    Fault(
        "missing resource",
        "resource",
        None,
        status=DENIED,
        message="the resource may not exist",
        uri="kbs:///default/key/none",
    ),
]


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    agent_log.configure("debug", "json", stream=stream)
    yield stream
    structlog.reset_defaults()


async def call(agent: RunningAgent, uri: str = "kbs:///default/key/1") -> bytes:
    reply = await agent.call(GET_RESOURCE, api_pb2.GetResourceRequest(ResourcePath=uri), api_pb2.GetResourceResponse)
    data: bytes = reply.Resource
    return data


async def outcome(agent: RunningAgent, uri: str) -> tuple[grpc.StatusCode, str]:
    try:
        assert await call(agent, uri) == SECRET
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def assert_clean(logs: io.StringIO) -> None:
    text = logs.getvalue()
    assert "Traceback" not in text
    assert "rpc.crash" not in text
    assert SECRET.decode("latin-1") not in text
    assert base64.b64encode(SECRET).decode() not in text
    assert "eyJ" not in text  # no token, JWS or JWE part (base64url of '{"') is ever logged
    for line in text.splitlines():
        json.loads(line)


@pytest.mark.parametrize("fault", MATRIX, ids=[f.name for f in MATRIX])
async def test_fault(fault: Fault, tmp_path: Path, dev_kbs: DevKbsServer, logs: io.StringIO) -> None:
    options = {"timeout_s": 2.0, **fault.options}
    agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url, **options)
    try:
        if fault.warm:
            assert await call(agent) == SECRET
        if fault.kind is not None:
            dev_kbs.core.faults.add(fault.step, fault.kind, fault.arg, times=fault.times)
        code, details = await outcome(agent, fault.uri)
        if fault.status is RECOVERS:
            assert (code, details) == (grpc.StatusCode.OK, "")
        else:
            assert code is fault.status, details
            assert fault.message in details
            assert len(details) < 400
        if fault.kind is not None:
            assert dev_kbs.core.faults.applied.get(fault.kind, 0) >= 1  # the fault really happened
        dev_kbs.core.faults.clear()
        assert await call(agent) == SECRET  # the agent keeps serving
    finally:
        await stop_agent(agent)
    assert_clean(logs)


async def test_foreign_key_token_never_reaches_get_token(
    tmp_path: Path, dev_kbs: DevKbsServer, logs: io.StringIO
) -> None:
    agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url, timeout_s=1.0)
    try:
        dev_kbs.core.faults.add("attest", "foreign-pubkey")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent.call(GET_TOKEN, aa.GetTokenRequest(TokenType="kbs"), aa.GetTokenResponse)
        assert info.value.code() is UNAVAILABLE
        assert "another key" in (info.value.details() or "")
        reply = await agent.call(GET_TOKEN, aa.GetTokenRequest(TokenType="kbs"), aa.GetTokenResponse)
        assert set(json.loads(reply.Token)) == {"token", "tee_keypair"}
    finally:
        await stop_agent(agent)
    assert "PRIVATE KEY" not in logs.getvalue()
    assert_clean(logs)


async def test_expired_session_recovers(tmp_path: Path, dev_kbs: DevKbsServer, logs: io.StringIO) -> None:
    agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url, timeout_s=1.0)
    try:
        assert await call(agent) == SECRET
        real_clock = dev_kbs.core.clock
        dev_kbs.core.clock = lambda: real_clock() + 3600  # the KBS forgets the session and rejects the token
        assert await call(agent) == SECRET
        assert dev_kbs.core.counters["auth"] == 2
    finally:
        await stop_agent(agent)
    assert_clean(logs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_down_at_start_then_up(tmp_path: Path, resources: Path, logs: io.StringIO) -> None:
    port = free_port()
    agent = await start_agent(str(tmp_path / "a.sock"), f"http://127.0.0.1:{port}", timeout_s=2.0)
    try:
        code, details = await outcome(agent, "kbs:///default/key/1")
        assert code is UNAVAILABLE
        assert details.startswith(f"KBS at http://127.0.0.1:{port} is unreachable: ConnectError")
        with DevKbsServer(resources, port=port):
            assert await call(agent) == SECRET
    finally:
        await stop_agent(agent)
    assert_clean(logs)


async def test_killed_and_restarted_mid_run(tmp_path: Path, resources: Path, logs: io.StringIO) -> None:
    port = free_port()
    agent = await start_agent(str(tmp_path / "a.sock"), f"http://127.0.0.1:{port}", timeout_s=2.0)
    try:
        with DevKbsServer(resources, port=port):
            assert await call(agent) == SECRET
        code, _ = await outcome(agent, "kbs:///default/key/1")
        assert code is UNAVAILABLE  # down
        with DevKbsServer(resources, port=port) as restarted:  # new signing key, every session lost
            results = await asyncio.gather(*(call(agent) for _ in range(5)))
            assert results == [SECRET] * 5
            assert restarted.core.counters["rejected"] == 0
            assert restarted.core.counters["auth"] == 1  # one new handshake shared by the five callers
    finally:
        await stop_agent(agent)
    assert_clean(logs)


@pytest.mark.parametrize(
    ("host", "trust", "message"),
    [
        ("127.0.0.1", False, "CERTIFICATE_VERIFY_FAILED"),
        ("localhost", True, "certificate is not valid for 'localhost'"),
    ],
    ids=["wrong CA", "wrong hostname"],
)
async def test_tls_failures(  # noqa: PLR0917 - pytest fixtures and parameters
    tmp_path: Path, resources: Path, tls_files: TlsFiles, logs: io.StringIO, host: str, trust: bool, message: str
) -> None:
    with DevKbsServer(resources, tls_cert=str(tls_files.cert), tls_key=str(tls_files.key)) as kbs:
        options: dict[str, Any] = {"cert_path": str(tls_files.ca)} if trust else {}
        agent = await start_agent(str(tmp_path / "a.sock"), f"https://{host}:{kbs.port}", timeout_s=2.0, **options)
        try:
            code, details = await outcome(agent, "kbs:///default/key/1")
            assert code is UNAVAILABLE
            assert message in details
            assert details.startswith(f"KBS at https://{host}:{kbs.port} is unreachable")
            assert kbs.core.counters["auth"] == 0
        finally:
            await stop_agent(agent)
    assert_clean(logs)


async def test_passport_mode_with_the_attestation_agent_down(
    tmp_path: Path, dev_kbs: DevKbsServer, logs: io.StringIO
) -> None:
    missing = tmp_path / "no-aa.sock"
    hub = {"backend": "passport", "aa_socket": str(missing)}
    agent = await start_agent(str(tmp_path / "a.sock"), dev_kbs.url, timeout_s=2.0, hub_options=hub)
    try:
        code, details = await outcome(agent, "kbs:///default/key/1")
    finally:
        await stop_agent(agent)
    assert code is UNAVAILABLE
    assert details == (
        f"the attestation agent at {missing} gave no KBS token: UNAVAILABLE: cannot connect to ttRPC socket {missing}"
    )
    assert_clean(logs)
