"""Every RPC outcome is logged once with the status the caller got (issue 9, item 9), on gRPC and ttRPC.

A reply over the transport's limit (gRPC: RESOURCE_EXHAUSTED; ttRPC: the reference's INVALID_ARGUMENT
"message length ... exceed ..."), a reply the reply budget refuses after its handler ran (RESOURCE_EXHAUSTED;
REST: 503), a call whose deadline passes (DEADLINE_EXCEEDED) and a call the client abandons (CANCELLED) are
each one `rpc` line (REST: `rest.request`) with that code, never `OK`, and never a second line.
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
from agent.api.budget import Charge, ReplyBudget
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
LARGE = 100 * 1024
"""Over the 64 KiB that replies may have without being charged to the reply budget."""
LARGE_REPLY = api_pb2.GetResourceResponse(Resource=b"r" * LARGE).SerializeToString()


async def big(_request: Any) -> Message:
    return api_pb2.GetResourceResponse(Resource=b"r" * FIVE_MIB)


LARGE_CALLS: list[str] = []


async def large(_request: Any) -> Message:
    LARGE_CALLS.append("Large")
    return api_pb2.GetResourceResponse.FromString(LARGE_REPLY)


async def slow(_request: Any) -> Message:
    await asyncio.sleep(30)
    return api_pb2.GetResourceResponse()


METHODS = [
    Method(SVC, "Big", api_pb2.GetResourceRequest, big),
    Method(SVC, "Large", api_pb2.GetResourceRequest, large),
    Method(SVC, "Slow", api_pb2.GetResourceRequest, slow),
]


class Servers:
    def __init__(self, root: Path, stream: io.StringIO) -> None:
        self.grpc_socket = str(root / "g.sock")
        self.ttrpc_socket = str(root / "t.sock")
        self.stream = stream
        self.budget = ReplyBudget(wait_s=0)  # shared, as in the daemon; a reply that finds it full is refused
        self.grpc = GrpcServer(METHODS, [ListenAddress(unix_path=self.grpc_socket)], reply_budget=self.budget)
        self.ttrpc: TtrpcServer = build_ttrpc_server(METHODS, reply_budget=self.budget)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def rpc_lines(self, name: str) -> list[dict[str, Any]]:
        return [
            line for line in self.lines() if line["event"] in ("rpc", "rpc.crash") and line["rpc"] == f"/{SVC}/{name}"
        ]


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


async def fill(budget: ReplyBudget) -> Charge:
    """Charge the whole budget (as if peers that do not read held every byte), once earlier replies' charges are
    back: a call's line is written when its reply is admitted, its charge returns when the peer has taken it."""
    for _ in range(200):
        if budget.held == 0:
            break
        await asyncio.sleep(0.02)
    charge = await budget.charge(budget.limit_bytes)
    assert charge is not None
    return charge


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


def refused_text(size: int, budget: ReplyBudget) -> str:
    return (
        f"reply is {size} bytes and the {budget.limit_bytes}-byte reply budget is held by replies waiting for"
        " their readers; try again"
    )


async def call_large(servers: Servers) -> tuple[tuple[str, str], tuple[str, str]]:
    """Large on gRPC then on ttRPC: (code, message) of each, "OK" with the reply's size if it came."""
    async with grpc.aio.insecure_channel(f"unix:{servers.grpc_socket}") as channel:
        stub: Any = channel.unary_unary(f"/{SVC}/Large")
        try:
            grpc_outcome = ("OK", str(len(await stub(b"", timeout=10))))
        except grpc.aio.AioRpcError as exc:
            grpc_outcome = (exc.code().name, exc.details() or "")
    async with TtrpcClient(servers.ttrpc_socket) as client:
        try:
            ttrpc_outcome = ("OK", str(len(await client.call(SVC, "Large", b"", timeout=10))))
        except RpcError as exc:
            ttrpc_outcome = (exc.code.name, exc.message)
    return grpc_outcome, ttrpc_outcome


async def test_a_reply_the_budget_refuses_is_one_line_saying_so(servers: Servers) -> None:
    budget = servers.budget
    LARGE_CALLS.clear()
    full = await fill(budget)
    try:
        outcomes = await call_large(servers)
    finally:
        full.release()
    assert LARGE_CALLS == ["Large", "Large"]  # refused after the handler ran
    ttrpc_size = len(LARGE_REPLY) + 32  # what the ttRPC server charges: the payload and a bound on its framing
    assert outcomes == (
        ("RESOURCE_EXHAUSTED", refused_text(len(LARGE_REPLY), budget)),
        ("RESOURCE_EXHAUSTED", refused_text(ttrpc_size, budget)),
    )
    lines = await settle(servers, "Large", 2)
    assert servers.lines() == lines  # the call's line is the only line: no `code=OK` one, no refusal event
    for line in lines:
        assert line["request_id"]
        assert line["duration_ms"] >= 0
    assert [
        (line["level"], line["transport"], line["code"], line["length"], line["limit"], line["held"]) for line in lines
    ] == [
        ("warning", "grpc", "RESOURCE_EXHAUSTED", len(LARGE_REPLY), budget.limit_bytes, budget.limit_bytes),
        ("warning", "ttrpc", "RESOURCE_EXHAUSTED", ttrpc_size, budget.limit_bytes, budget.limit_bytes),
    ]
    assert [line["message"] for line in lines] == [message for _code, message in outcomes]
    assert budget.held == 0


async def test_a_grpc_reply_still_waiting_for_budget_at_the_deadline_is_one_deadline_line(servers: Servers) -> None:
    budget = servers.budget
    budget.wait_s = 30  # the reply waits for room; gRPC cancels the call at its deadline
    full = await fill(budget)
    try:
        async with grpc.aio.insecure_channel(f"unix:{servers.grpc_socket}") as channel:
            stub: Any = channel.unary_unary(f"/{SVC}/Large")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub(b"", timeout=0.5)
        lines = await settle(servers, "Large", 1)
    finally:
        full.release()
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert [(line["level"], line["transport"], line["code"]) for line in lines] == [
        ("warning", "grpc", "DEADLINE_EXCEEDED")
    ]
    assert budget.waiting == 0
    assert budget.held == 0


async def test_a_call_refused_before_its_handler_runs_is_one_line_saying_so(servers: Servers) -> None:
    budget = servers.budget
    assert await call_large(servers) == (("OK", str(len(LARGE_REPLY))), ("OK", str(len(LARGE_REPLY))))
    await settle(servers, "Large", 2)
    LARGE_CALLS.clear()
    position = len(servers.stream.getvalue())
    # Large has made a reply over 64 KiB: its calls now reserve that much before their handler runs
    full = await fill(budget)
    try:
        outcomes = await call_large(servers)
    finally:
        full.release()
    assert LARGE_CALLS == []  # no work done
    expected = refused_text(len(LARGE_REPLY), budget)
    assert outcomes == (("RESOURCE_EXHAUSTED", expected), ("RESOURCE_EXHAUSTED", expected))
    await settle(servers, "Large", 4)
    lines = [json.loads(line) for line in servers.stream.getvalue()[position:].splitlines()]
    assert [
        (line["event"], line["level"], line["rpc"], line["transport"], line["code"], line["message"]) for line in lines
    ] == [
        ("rpc", "warning", f"/{SVC}/Large", "grpc", "RESOURCE_EXHAUSTED", expected),
        ("rpc", "warning", f"/{SVC}/Large", "ttrpc", "RESOURCE_EXHAUSTED", expected),
    ]
    for line in lines:
        assert line["request_id"]
        assert line["duration_ms"] >= 0
        assert (line["length"], line["limit"], line["held"]) == (
            len(LARGE_REPLY),
            budget.limit_bytes,
            budget.limit_bytes,
        )


async def test_a_served_reply_is_one_ok_line(servers: Servers) -> None:
    assert await call_large(servers) == (("OK", str(len(LARGE_REPLY))), ("OK", str(len(LARGE_REPLY))))
    lines = await settle(servers, "Large", 2)
    assert servers.lines() == lines
    assert [(line["level"], line["transport"], line["code"]) for line in lines] == [
        ("info", "grpc", "OK"),
        ("info", "ttrpc", "OK"),
    ]
    for line in lines:  # the usual OK line, nothing more
        assert sorted(line) == ["code", "duration_ms", "event", "level", "request_id", "rpc", "timestamp", "transport"]


class _ResourceClient:
    """Stands in for api-server-rest's ttRPC client: every call answers a `LARGE`-byte resource."""

    async def call(self, *_args: object, **_kwargs: object) -> bytes:
        return LARGE_REPLY


async def rest_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_rest_a_reply_the_budget_refuses_is_one_line_saying_so() -> None:
    from agent.compat.rest import ConnectionLimiter, RestApi, _serve_connection

    stream = io.StringIO()
    agent_log.configure("info", "json", stream=stream)
    client: Any = _ResourceClient()
    api = RestApi(features="all", aa_client=client, cdh_client=client)
    budget = ReplyBudget(wait_s=0)
    limiter = ConnectionLimiter(reply_budget=budget)
    server = await asyncio.start_server(lambda r, w: _serve_connection(api, r, w, limiter), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        full = await budget.charge(budget.limit_bytes)
        assert full is not None
        try:
            refused = await rest_get(port, "/cdh/resource/a/b/c?x=1")
        finally:
            full.release()
        served = await rest_get(port, "/cdh/resource/a/b/c")
    finally:
        server.close()
        await server.wait_closed()
        structlog.reset_defaults()
    text = f"reply is {LARGE} bytes and the {budget.limit_bytes}-byte reply budget is held by replies waiting for"
    assert refused == (503, f"{text} their readers".encode())
    assert served == (200, b"r" * LARGE)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    durations = [line.pop("duration_ms") for line in lines]
    assert all(isinstance(ms, float | int) and ms >= 0 for ms in durations)
    assert lines == [
        {
            "event": "rest.request",
            "level": "warning",
            "timestamp": lines[0]["timestamp"],
            "method": "GET",
            "path": "/cdh/resource/a/b/c",
            "status": 503,
            "length": LARGE,
            "limit": budget.limit_bytes,
            "held": budget.limit_bytes,
        },
        {
            "event": "rest.request",
            "level": "info",
            "timestamp": lines[1]["timestamp"],
            "method": "GET",
            "path": "/cdh/resource/a/b/c",
            "status": 200,
        },
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
