"""Every RPC outcome is logged once with the status the caller got (issue 9, item 9), on gRPC and ttRPC.

A reply over the transport's limit (gRPC: RESOURCE_EXHAUSTED; ttRPC: the reference's INVALID_ARGUMENT
"message length ... exceed ..."), a call whose deadline passes (DEADLINE_EXCEEDED) and a call the client
abandons (CANCELLED) are each one `rpc` line with that code, never `OK`.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog
from google.protobuf.message import Message

from agent import log as agent_log
from agent.api._gen import api_pb2
from agent.api.grpc_server import GrpcServer
from agent.api.methods import Method
from agent.api.status import RpcError, StatusCode
from agent.api.ttrpc import TtrpcClient, TtrpcServer
from agent.api.ttrpc_frame import RpcResponse
from agent.api.ttrpc_service import build_ttrpc_server
from agent.config import ListenAddress

pytestmark = pytest.mark.integration

SVC = "test.Status"
FIVE_MIB = 5 * 1024 * 1024


async def big(_request: Any) -> Message:
    return api_pb2.GetResourceResponse(Resource=b"r" * FIVE_MIB)


async def slow(_request: Any) -> Message:
    await asyncio.sleep(30)
    return api_pb2.GetResourceResponse()


METHODS = [
    Method(SVC, "Big", api_pb2.GetResourceRequest, big),
    Method(SVC, "Slow", api_pb2.GetResourceRequest, slow),
]


class Servers:
    def __init__(self, root: Path, stream: io.StringIO) -> None:
        self.grpc_socket = str(root / "g.sock")
        self.ttrpc_socket = str(root / "t.sock")
        self.stream = stream
        self.grpc = GrpcServer(METHODS, [ListenAddress(unix_path=self.grpc_socket)])
        self.ttrpc: TtrpcServer = build_ttrpc_server(METHODS)

    def rpc_lines(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [line for line in lines if line["event"] in ("rpc", "rpc.crash") and line["rpc"] == f"/{SVC}/{name}"]


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Servers]:
    stream = io.StringIO()
    agent_log.configure("info", "json", stream=stream)
    running = Servers(tmp_path, stream)
    await running.grpc.start()
    await running.ttrpc.start(running.ttrpc_socket)
    try:
        yield running
    finally:
        await running.ttrpc.close(grace_s=0)
        await running.grpc.stop(0)
        structlog.reset_defaults()


async def settle(servers: Servers, name: str, count: int) -> list[dict[str, Any]]:
    for _ in range(200):
        lines = servers.rpc_lines(name)
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.02)
    return servers.rpc_lines(name)


async def test_oversized_reply(servers: Servers) -> None:
    async with grpc.aio.insecure_channel(f"unix:{servers.grpc_socket}") as channel:
        stub: Any = channel.unary_unary(f"/{SVC}/Big")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    async with TtrpcClient(servers.ttrpc_socket) as client:
        with pytest.raises(RpcError) as ttrpc_info:
            await client.call(SVC, "Big", b"", timeout=10)
    assert ttrpc_info.value.code is StatusCode.INVALID_ARGUMENT
    framed = RpcResponse(payload=api_pb2.GetResourceResponse(Resource=b"r" * FIVE_MIB).SerializeToString()).to_bytes()
    assert ttrpc_info.value.message == f"message length {len(framed)} exceed maximum message size of 4194304"
    lines = await settle(servers, "Big", 2)
    assert [(line["transport"], line["code"]) for line in lines] == [
        ("grpc", "RESOURCE_EXHAUSTED"),
        ("ttrpc", "INVALID_ARGUMENT"),
    ]


async def test_deadline_and_cancellation(servers: Servers) -> None:
    async with grpc.aio.insecure_channel(f"unix:{servers.grpc_socket}") as channel:
        stub: Any = channel.unary_unary(f"/{SVC}/Slow")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(b"", timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub(b"", timeout=30)
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await settle(servers, "Slow", 2)
    async with TtrpcClient(servers.ttrpc_socket) as client:
        with pytest.raises(RpcError) as ttrpc_info:
            await client.call(SVC, "Slow", b"", timeout=0.3)
        assert ttrpc_info.value.code is StatusCode.DEADLINE_EXCEEDED
    client = TtrpcClient(servers.ttrpc_socket)
    pending = asyncio.create_task(client.call(SVC, "Slow", b"", timeout=30))
    await asyncio.sleep(0.3)
    await client.close()  # the connection goes away with the call in flight
    with pytest.raises(RpcError):
        await pending
    lines = await settle(servers, "Slow", 4)
    assert [(line["transport"], line["code"]) for line in lines] == [
        ("grpc", "DEADLINE_EXCEEDED"),
        ("grpc", "CANCELLED"),
        ("ttrpc", "DEADLINE_EXCEEDED"),
        ("ttrpc", "CANCELLED"),
    ]


class _FailingClient:
    """Stands in for api-server-rest's ttRPC client: every call fails with the given status."""

    def __init__(self, code: StatusCode, message: str) -> None:
        self.code = code
        self.message = message

    async def call(self, *_args: object, **_kwargs: object) -> bytes:
        raise RpcError(self.code, self.message)


@pytest.mark.parametrize(
    ("code", "status"),
    [(StatusCode.INVALID_ARGUMENT, 400), (StatusCode.NOT_FOUND, 500), (StatusCode.UNAVAILABLE, 500)],
)
async def test_rest_answers_bad_input_400_and_others_500(code: StatusCode, status: int) -> None:
    from agent.compat.rest import RestApi

    message = "resource path is " + "x" * 5000
    client: Any = _FailingClient(code, message)
    api = RestApi(features="all", aa_client=client, cdh_client=client)
    reply = await api.handle("GET", "/cdh/resource/a/b/c", b"")
    assert reply.status == status
    assert reply.body.startswith(b"resource path is xxx")
    assert len(reply.body) < 450  # the text is cut, however long the upstream message
